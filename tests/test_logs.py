"""Console output a person can read: one handler, each message once, known third-party noise gone, progress bars
as lines in a log, a failed step's own message first (its traceback only with -v)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from hilight.logs import NOISE, LineProgress, configure_progress

HILIGHT = Path(sys.executable).with_name("hilight")
NOISE_SEEN_IN_THE_DEMO_LOG = ("Failed to disable MLflow autologging", "for ephemeral docs site",
                              "An input example was not provided")
CONFIG = """pipeline: data_validation
datasets:
  - {name: billiards, root: data/billiards, captions: [captions.json], qa: [qa.json]}
output_dir: outputs/dv
probe: {workers: 2}
"""


def test_redraws_become_lines():
    out = io.StringIO()
    stream = LineProgress(out)
    for text in ("\rbar   0%", "\rbar  50%   ", "\rbar 100%", "\n", "INFO x: done\n", "\rnext 0%", "\n"):
        stream.write(text)
    assert out.getvalue() == "bar   0%\nbar  50%\nbar 100%\nINFO x: done\nnext 0%\n"


@pytest.fixture
def restored_output(monkeypatch):
    """Whatever setup_logging / configure_progress change in this process is undone after the test."""
    import logging

    import tqdm.std

    monkeypatch.setattr(tqdm.std.tqdm, "__init__", tqdm.std.tqdm.__init__)
    for key in ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "HF_HUB_DISABLE_PROGRESS_BARS", "MLFLOW_CONFIGURE_LOGGING"):
        monkeypatch.delenv(key, raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {name: logging.getLogger(name).level for name in logging.root.manager.loggerDict}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, lvl in levels.items():
        logging.getLogger(name).setLevel(lvl)
    logging.captureWarnings(False)


def test_bars_without_a_terminal_print_a_line_at_most_every_interval(restored_output):
    from tqdm.auto import tqdm

    log = io.StringIO()  # not a terminal
    assert configure_progress("auto", log) == "lines"
    for _ in tqdm(range(10_000), desc="work"):  # well under 10 s: the first and the last state only
        pass
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 2
    assert lines[0].startswith("work:   0%") and lines[1].startswith("work: 100%")
    assert configure_progress("off", log) == "off"
    for _ in tqdm(range(10), desc="hidden", disable=False):
        pass
    assert "hidden" not in log.getvalue()


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TQDM_", "MLFLOW_CONFIGURE"))}
    return subprocess.run([str(HILIGHT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _assert_readable(output: str) -> None:
    lines = [line for line in output.splitlines() if line.strip()]
    repeated = {line: n for line, n in Counter(lines).items() if n > 1}
    assert not repeated, f"lines printed more than once: {repeated}"
    for noise in NOISE_SEEN_IN_THE_DEMO_LOG:
        assert noise not in output
    assert "\r" not in output and "\x1b[" not in output  # no redraws, no colour codes in a log


@pytest.mark.pipeline
def test_pipeline_log_has_each_message_once_and_no_noise(zenml_project, billiards_dir):
    root = zenml_project
    shutil.copytree(billiards_dir, root / "data" / "billiards")
    (root / "config.yaml").write_text(CONFIG)

    ok = _run("run", "data_validation", "-c", "config.yaml", "probe.workers=1", cwd=root)
    assert ok.returncode == 0, ok.stderr
    _assert_readable(ok.stdout + ok.stderr)
    assert "accepted / rejected   videos 24 / 0, captions" in ok.stdout
    assert f"report                {root / 'outputs/dv'}" in ok.stdout
    assert sum("probe videos" in line for line in ok.stderr.splitlines()) <= 3  # start, end (+1 if it took > 10 s)

    for p in sorted((root / "data/billiards/videos").glob("*.mp4"))[:6]:
        p.write_bytes(b"")
    failed = _run("run", "data_validation", "-c", "config.yaml", cwd=root)
    assert failed.returncode == 1
    _assert_readable(failed.stdout + failed.stderr)
    errors = [line for line in failed.stderr.splitlines() if "rejected by contract" in line]
    assert len(errors) == 1 and errors[0].startswith("pipeline data_validation run ")  # the project's message
    assert "Traceback" not in failed.stderr

    verbose = _run("-v", "run", "data_validation", "-c", "config.yaml", cwd=root)
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr and "DataRejectedError" in verbose.stderr


def test_noise_filters_sit_on_the_emitting_loggers(restored_output):
    import logging

    from hilight.logs import setup_logging

    stream = io.StringIO()
    setup_logging(0, progress="off", stream=stream)
    for name, fragments in NOISE.items():
        logging.getLogger(name).warning("x %s y", fragments[0])
        logging.getLogger(name).warning("something else from %s", name)
    text = stream.getvalue()
    assert all(f not in text for fragments in NOISE.values() for f in fragments)
    assert text.count("something else from") == len(NOISE)
