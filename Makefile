# Two commands: `make demo` and `make test`. Both bootstrap .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
COMPILED := $(VENV)/.compiled
DEEPSPEED := $(VENV)/.deepspeed
# Where the torch wheel comes from. Empty (default): pip's configured index, i.e. PyPI unless pip.conf or PIP_*
# say otherwise; on Linux x86_64 PyPI serves the CUDA build (several GB with its nvidia-* packages), on macOS and
# Windows a CPU build. Choose explicitly, e.g.
#   make install TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu     # CPU-only (laptop, CI)
#   make install TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128   # a given CUDA version
TORCH_INDEX_URL ?=

export ZENML_ANALYTICS_OPT_IN := false
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1

.PHONY: demo test install lock clean

demo: $(STAMP)
	$(VENV)/bin/hilight demo

test: $(STAMP) $(DEEPSPEED) $(COMPILED)
	$(PY) -m pytest -n 2

install: $(STAMP)

# torch first, from TORCH_INDEX_URL when set (see above), so the resolve below keeps that build.
$(STAMP): pyproject.toml requirements.lock
	@$(PYTHON) -c 'import sys; assert (3, 10) <= sys.version_info[:2] < (3, 14), f"need Python 3.10-3.13, got {sys.version}"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-compile $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) torch==2.13.0
	$(PY) -m pip install --quiet --no-compile -c requirements.lock -e ".[dev]"
	touch $(STAMP)

# DeepSpeed, for the tests only (the ZeRO-2 recipes run on its CPU accelerator); the demo does not need it.
$(DEEPSPEED): $(STAMP)
	$(PY) -m pip install --quiet --no-compile -c requirements.lock -e ".[deepspeed]"
	touch $(DEEPSPEED)

# Byte-compiling the installed packages, for the tests only. pip would do it one file at a time (about 95 s on 2
# cores); compileall -j 0 does the same files on every core (about 60 s). The tests start many processes (xdist
# workers, CLI subprocesses); where PYTHONDONTWRITEBYTECODE is set, each would compile what it imports (importing
# the stack took about 17 s with bytecode, twice that without). The demo is one process: three fresh demos here took
# 27.6 and 28.9 min without the compile step and 28.7 min with it, no difference this machine resolves; where Python
# writes bytecode as it imports, the demo no longer waits for it. As with pip, a file that does not compile under
# this Python (e.g. torch's py312-only test helper) is left to its package.
$(COMPILED): $(STAMP)
	$(PY) -m compileall -qq -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" || true
	touch $(COMPILED)

# refresh requirements.lock from the current environment. torch and its CUDA wheels (nvidia-*, triton) are left
# out: torch is installed first from TORCH_INDEX_URL, and a frozen local build (torch==2.13.0+cpu) or one
# platform's CUDA wheels would pin every other machine to it
lock:
	{ head -1 requirements.lock; $(PY) -m pip freeze --exclude-editable \
	  | grep -v -E '^(hilight|torch|triton)==|^nvidia-'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean:
	rm -rf .zenml/local_stores .zenml/config.yaml outputs data
