"""Process-wide defaults: offline operation and the project root; what a cached result depends on besides its inputs
(the versions of the numeric libraries, the source of the code that computed it).

Nothing here runs at import time; entry points (the CLI, tests, benchmarks) call
``apply_offline_defaults()`` once.
"""

from __future__ import annotations

import hashlib
import inspect
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


# One rule for relative paths:
#   - a path typed on the command line (``-c``, a video, ``--out``, ``-m``) means what the shell means: it is relative
#     to the working directory (``cli_path``);
#   - a path written inside a config file (``root``, ``manifest_dir``, ``model.init``, ``output_dir``, other
#     configs named by a retrain or ablation config) and the CLI's defaults are relative to the project root
#     (``resolve_path``), so a config means the same thing from whatever directory it is run.


def resolve_path(path: str | Path, root: Path | None = None) -> Path:
    """A path written inside a config: ``path`` itself if absolute, else relative to the project root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (root or project_root()) / p


def cli_path(path: str | Path) -> Path:
    """A path typed on the command line: absolute, relative to the working directory (``..`` collapsed)."""
    return Path(os.path.abspath(os.path.expanduser(path)))


# Installed libraries whose version can change what a stage computes: kernels and numerics (torch, numpy), model and
# adapter code (transformers, peft, accelerate), weight files (safetensors), video decoding (decord; PyAV sizes it).
NUMERIC_PACKAGES = ("torch", "numpy", "transformers", "peft", "accelerate", "safetensors", "decord", "av")


def package_versions(names: tuple[str, ...] = NUMERIC_PACKAGES) -> dict[str, str]:
    """``{distribution: installed version}`` (``"absent"`` when not installed), for cache keys: after an upgrade a
    cached result is computed again instead of being returned as if today's libraries had produced it."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def source_digest(*objects) -> str:
    """SHA-256 over the source of ``objects`` (modules, classes, functions), in the order given: a cache key part
    that changes with any edit of the code that computed the cached values (comments included: a needless
    recomputation is cheaper than a stale value)."""
    h = hashlib.sha256()
    for obj in objects:
        label = f"{getattr(obj, '__module__', '')}:{getattr(obj, '__qualname__', obj.__name__)}"
        h.update(label.encode() + b"\0" + inspect.getsource(obj).encode() + b"\0")
    return h.hexdigest()
