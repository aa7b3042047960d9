"""Console output of the ``hilight`` command: one logging handler, each message once, known third-party noise
filtered at the logger that emits it, and progress bars that suit where the output goes.

* One handler on the root logger (stderr, ``LEVEL logger: message``). ZenML adds a coloured console handler of its
  own when it is imported, which printed every record a second time; ``adopt_console`` removes it and keeps
  ZenML's other handler, the one that stores step logs for its dashboard. MLflow configures a handler of its own
  unless ``MLFLOW_CONFIGURE_LOGGING=false``, which ``setup_logging`` sets so MLflow's records reach the one handler.
* Noise is dropped by a filter on the exact logger that emits it (``NOISE``), never by silencing a library or
  Python warnings globally: anything else those loggers say still shows.
* Verbosity: ``-q`` shows warnings and errors; the default adds the project's own INFO records; ``-v`` adds other
  libraries' INFO records and the tracebacks of failed steps (without ``-v`` the command's own message, which names
  every failed step and what it raised, is the report of a failure); ``-vv`` is DEBUG everywhere.
* Progress (tqdm, which every bar in the project and in transformers uses): live bars on a terminal; when stderr is
  not a terminal (a log file, CI, a pipe) each bar prints a line when it starts, at most every ``LOG_INTERVAL_S``
  and when it ends, each on its own line instead of thousands of carriage-return redraws; ``--no-progress`` (and
  ``-q``) turns bars off.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Any, Literal, TextIO

OWN_LOGGERS = ("hilight", "steps", "pipelines", "__main__")
STEP_FAILURE_LOGGERS = ("zenml.orchestrators",)  # "Failed to run step ...", "Step ... failed."
LOG_INTERVAL_S = 10.0
FORMAT = "%(levelname)s %(name)s: %(message)s"

# logger -> fragments of messages it emits that say nothing a user can act on
NOISE: dict[str, tuple[str, ...]] = {
    # ZenML's MLflow tracker tries to switch off autologging for every framework MLflow knows, and warns on every
    # step that fastai (not installed, not used) could not be imported.
    "zenml.integrations.mlflow.experiment_trackers.mlflow_experiment_tracker": (
        "Failed to disable MLflow autologging",),
    # Great Expectations creates an ephemeral context per suite and announces its throw-away docs directory.
    "great_expectations.data_context.types.base": ("for ephemeral docs site",),
    # (with -v) Great Expectations' API-docs registry, about its own functions, ~40 lines per import
    "great_expectations._docs_decorators": ("Skipping registering function",),
}

Progress = Literal["auto", "off"]


class DropMessages(logging.Filter):
    """Drop records whose message contains one of ``fragments``."""

    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


class ThirdPartyTracebacks(logging.Filter):
    """Without ``-v``, a library's error record shows its message but not the traceback it carries. ZenML's
    orchestrator reports a failed step twice, each with the whole stack, before the command can say what went wrong;
    the command's own message carries every failed step's error (``pipelines.run.PipelineFailedError``), so those
    two records are held back and the project's message is the first thing a user reads."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.name.startswith(STEP_FAILURE_LOGGERS):
            return False
        if record.exc_info and not record.name.startswith(OWN_LOGGERS):
            exc = record.exc_info[1]
            if exc is not None and str(exc) not in record.getMessage():
                record.msg = f"{record.getMessage()}: {type(exc).__name__}: {exc}"
                record.args = ()
            record.exc_info = None
            record.exc_text = None
        return True


class LineProgress:
    """A file for tqdm when the output is not a terminal: each redraw becomes its own line (tqdm starts a redraw
    with a carriage return and pads it with spaces to cover the previous one)."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.at_line_start = True
        self.last = ""

    def write(self, text: str) -> int:
        if text.startswith("\r"):
            text = text.lstrip("\r").rstrip(" \r")
            if not text or text == self.last:  # an empty bar's closing redraw says nothing new
                return 0
            self.last = text
            if not self.at_line_start:
                text = "\n" + text
        elif text == "\n" and self.at_line_start:
            return 0  # the bar's closing newline after a line we already ended
        self.stream.write(text)
        self.at_line_start = text.endswith("\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding: the real stream's
        return getattr(self.stream, name)


def setup_logging(verbosity: int = 0, *, progress: Progress = "auto", stream: TextIO | None = None) -> None:
    """Configure the process's console output (call once, from the entry point, before ZenML or MLflow are
    imported). ``verbosity``: -1 quiet, 0 default, 1 ``-v``, 2 ``-vv``."""
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_hilight", False)]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler._hilight = True  # type: ignore[attr-defined]
    if verbosity < 1:
        handler.addFilter(ThirdPartyTracebacks())
    root.addHandler(handler)
    _set_levels(verbosity)
    for name, fragments in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in logger.filters):
            logger.addFilter(DropMessages(fragments))
    if verbosity < 0:
        progress = "off"
    configure_progress(progress, stream or sys.stderr)
    logging.captureWarnings(True)  # Python warnings become records of the `py.warnings` logger: one format, once


def _set_levels(verbosity: int) -> None:
    own = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    others = {-1: logging.WARNING, 0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    logging.getLogger().setLevel(others)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(own)
    # libraries that set their own logger's level on import (which would override the root's)
    for name in ("zenml", "mlflow", "great_expectations", "alembic", "urllib3", "httpx", "git", "matplotlib"):
        logging.getLogger(name).setLevel(logging.NOTSET if verbosity >= 1 else others)
    global _verbosity
    _verbosity = verbosity


_verbosity = 0  # the level setup_logging chose, re-applied after ZenML's import resets it


def adopt_console(foreign_handler: type) -> None:
    """Undo what an orchestration library's import did to logging (ZenML adds a coloured console handler to the root
    logger and resets the root level): the one console handler stays ours. The caller (the console entry point, the
    only module allowed to import ZenML) passes the handler class; other handlers (ZenML's step logs) stay."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, foreign_handler)]:
        root.removeHandler(handler)
        handler.close()
    _set_levels(_verbosity)


def configure_progress(progress: Progress = "auto", stream: TextIO | None = None) -> str:
    """Set tqdm's defaults for this process; returns the mode in effect: ``"bars"`` (a terminal), ``"lines"`` (not
    a terminal: a line at most every ``LOG_INTERVAL_S`` per bar) or ``"off"``.

    tqdm offers ``TQDM_*`` environment defaults, but it reads them once at import and the project's bars pass
    ``disable=`` themselves, so the defaults are set on tqdm's constructor instead."""
    import tqdm.std

    stream = stream or sys.stderr
    mode = "off" if progress == "off" else "bars" if stream.isatty() else "lines"
    if mode != "bars":
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    cls = tqdm.std.tqdm
    original = getattr(cls.__init__, "_hilight_original", cls.__init__)
    if mode == "bars":
        cls.__init__ = original
        return mode
    lines = LineProgress(stream)

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        if mode == "off":
            kwargs["disable"] = True
        else:
            kwargs.setdefault("mininterval", LOG_INTERVAL_S)
            kwargs.setdefault("file", lines)
        original(self, *args, **kwargs)

    __init__._hilight_original = original  # type: ignore[attr-defined]
    cls.__init__ = __init__
    return mode
