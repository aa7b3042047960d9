# Two commands: `make demo` and `make test`. Both bootstrap .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

export ZENML_ANALYTICS_OPT_IN := false
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1

.PHONY: demo test install lock clean

demo: $(STAMP)
	$(VENV)/bin/hilight demo

test: $(STAMP)
	$(PY) -m pytest -n 2

install: $(STAMP)

# torch first, from its CPU wheel: an unpinned resolve would pull gigabytes of CUDA packages
$(STAMP): pyproject.toml requirements.lock
	@$(PYTHON) -c 'import sys; assert (3, 10) <= sys.version_info[:2] < (3, 14), f"need Python 3.10-3.13, got {sys.version}"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c requirements.lock -e ".[dev]"
	touch $(STAMP)

# refresh requirements.lock from the current environment
lock:
	$(PY) -m pip freeze --exclude-editable | grep -v '^hilight' > requirements.lock

clean:
	rm -rf .zenml/local_stores .zenml/config.yaml outputs data
