"""YAML configs parsed into typed pydantic models at the boundary, with every error reported at once."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config file is unreadable or invalid; the message lists every problem with its key path."""


def load_config(path: str | Path, model: type[M]) -> M:
    """Read ``path`` and validate it as ``model``; raise ``ConfigError`` naming every bad key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = "\n".join(
            f"  - {'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            + (f" (got {err['input']!r})" if err["type"] != "missing" and not isinstance(err["input"], dict) else "")
            for err in exc.errors()
        )
        raise ConfigError(f"config file {path} has {exc.error_count()} problem(s):\n{problems}") from None


def deep_merge(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` applied: nested mappings merge key by key, anything else replaces."""
    out = dict(base)
    for k, v in overrides.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def import_object(ref: str):
    """``"package.module:Name"`` -> the object."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)
