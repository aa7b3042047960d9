"""YAML configs parsed into typed pydantic models at the boundary, with every error reported at once."""

from __future__ import annotations

import copy
import importlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config file is unreadable or invalid; the message lists every problem with its key path."""


def load_config(path: str | Path, model: type[M], overrides: Sequence[str] = ()) -> M:
    """Read ``path``, apply ``key.path=value`` ``overrides`` (see ``apply_overrides``) and validate it as ``model``;
    raise ``ConfigError`` naming every bad key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = "\n".join(
            f"  - {'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            + (f" (got {err['input']!r})" if err["type"] != "missing" and not isinstance(err["input"], dict) else "")
            for err in exc.errors()
        )
        source = f"config file {path}" + (f" with overrides {' '.join(overrides)}" if overrides else "")
        raise ConfigError(f"{source} has {exc.error_count()} problem(s):\n{problems}") from None


_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """A copy of ``raw`` with command-line overrides applied, in the form torchtune, Hydra and LLaMA-Factory take:
    ``train.lr=1e-4``, ``data.train_datasets=[billiards, general]``, ``data.sources.0.ratio=0.5`` (a number indexes
    a list). Each value is parsed as YAML (``yaml.safe_load``: numbers, booleans, ``null``, lists, mappings).
    Missing keys are created, so the model's validation reports an unknown path exactly as it reports a typo in
    the file (with its key path and the closest valid key)."""
    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"override {item!r} is not KEY.PATH=VALUE (e.g. train.lr=1e-4)")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc}); quote it") from None
        if isinstance(value, str) and _EXPONENT.fullmatch(value):
            value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string; on a command line it is a number
        node: Any = out
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not (part.isdigit() and int(part) < len(node)):
                    raise ConfigError(f"override {item!r}: {'.'.join(parts[:depth]) or '<root>'} is a list of "
                                      f"{len(node)}; {part!r} is not an index into it")
                part = int(part)
            elif not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:depth])} is {node!r}, not a mapping, so it "
                                  f"has no key {part!r}")
            elif not last and node.get(part) is None:
                node[part] = {}  # a section the file leaves out (or sets to null): filled from the override
            if last:
                node[part] = value
            else:
                node = node[part]
    return out


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
