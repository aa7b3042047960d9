"""Process-wide defaults: offline operation and the project root.

Nothing here runs at import time; entry points (the CLI, tests, benchmarks) call
``apply_offline_defaults()`` once.
"""

from __future__ import annotations

import os
from pathlib import Path

OFFLINE_DEFAULTS = {
    "ZENML_ANALYTICS_OPT_IN": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "ZENML_LOGGING_VERBOSITY": "WARN",
}

_MARKER = Path(".zenml") / "stack.yaml"


def apply_offline_defaults() -> None:
    """Set the offline/telemetry environment variables unless the user already set them."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)


def project_root(start: Path | None = None) -> Path:
    """The HiLight project directory.

    ``HILIGHT_PROJECT_ROOT`` wins; otherwise the nearest parent of ``start`` (default: the
    working directory) holding ``.zenml/stack.yaml``; otherwise the source checkout this package
    was imported from; otherwise the working directory.
    """
    if env := os.environ.get("HILIGHT_PROJECT_ROOT"):
        return Path(env).resolve()
    here = (start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / _MARKER).is_file():
            return candidate
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / _MARKER).is_file():
        return checkout
    return here


def resolve_path(path: str | Path, root: Path | None = None) -> Path:
    """An absolute path: ``path`` itself if absolute, else relative to the project root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (root or project_root()) / p
