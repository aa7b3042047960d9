"""YAML configs parsed into typed pydantic models at the boundary, with every error reported at once.

Every config model forbids unknown keys (``extra="forbid"``, checked by ``tests/test_strict_configs.py``), and an
unknown key is reported with the closest valid name at that place ("did you mean `captions`?"), so a typo can never
silently switch a setting off.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import re
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class InputError(ValueError):
    """Bad input from the user (a path, a name, a file): the message names the value, the problem and the fix. The
    CLI prints it and exits 2, without a traceback unless ``-v``."""


class ConfigError(InputError):
    """A config file is unreadable or invalid; the message lists every problem with its key path."""


def load_config(path: str | Path, model: type[M], overrides: Sequence[str] = ()) -> M:
    """Read ``path``, apply ``key.path=value`` ``overrides`` (see ``apply_overrides``) and validate it as ``model``;
    raise ``ConfigError`` naming every bad key."""
    path = Path(path)
    raw = apply_overrides(read_yaml_mapping(path), overrides)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        source = f"config file {path}" + (f" with overrides {' '.join(overrides)}" if overrides else "")
        raise ConfigError(f"{source} has {exc.error_count()} problem(s):\n"
                          f"{format_validation_errors(exc, model)}") from None


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


def read_yaml_mapping(path: Path) -> dict:
    """The top-level mapping of a YAML file; ``ConfigError`` saying what is wrong with the file otherwise."""
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.y*ml"))
        hint = f" (it holds {', '.join(found[:8])})" if found else ""
        raise ConfigError(f"config {path} is a directory, not a YAML file{hint}; pass the file, e.g. -c {path}/<name>.yaml")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (PermissionError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read as UTF-8 text: {exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if raw is None:
        raise ConfigError(f"config file {path} is empty; it must hold a mapping such as `pipeline: ...`")
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping (key: value lines) at the top level, got a "
                          f"{type(raw).__name__}")
    return raw


def format_validation_errors(exc: ValidationError, model: type[BaseModel]) -> str:
    """One line per problem: the key path, pydantic's message and the bad value; an unknown key gets the closest
    valid key at its place (difflib) or, without a close one, the list of valid keys."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            lines.append(f"  - {where}: {unknown_key_message(model, err['loc'])}")
            continue
        shown = err["type"] != "missing" and not isinstance(err["input"], dict)
        lines.append(f"  - {where}: {err['msg']}" + (f" (got {err['input']!r})" if shown else ""))
    return "\n".join(lines)


def unknown_key_message(model: type[BaseModel], loc: tuple) -> str:
    """``unknown key `capions`; did you mean `captions`?`` for the key at ``loc`` (its parent path inside
    ``model``)."""
    key = str(loc[-1])
    valid = sorted({name for m in _models_at(model, loc[:-1]) for name in _field_names(m)})
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return f"unknown key `{key}`; did you mean `{close[0]}`?"
    return f"unknown key `{key}`" + (f"; valid keys here: {', '.join(valid)}" if valid else "")


def _field_names(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _flatten(annotation: Any) -> Iterator[Any]:
    """The alternatives of an annotation: unions and ``Optional`` split, ``Annotated`` unwrapped."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        yield from _flatten(typing.get_args(annotation)[0])
    elif origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            yield from _flatten(arg)
    else:
        yield annotation


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _models_at(model: type[BaseModel], path: tuple) -> list[type[BaseModel]]:
    """The model classes a validation-error location ``path`` can point into (several for unions)."""
    current: list[Any] = [model]
    for part in path:
        nxt = []
        for ann in current:
            for t in _flatten(ann):
                origin, args = typing.get_origin(t), typing.get_args(t)
                if _is_model(t):
                    if part == t.__name__:  # pydantic names the union member it tried
                        nxt.append(t)
                    for name, f in t.model_fields.items():
                        if part in (name, f.alias):
                            nxt.append(f.annotation)
                elif isinstance(part, int) and origin in (list, tuple, set, frozenset) and args:
                    nxt.extend(a for a in args if a is not Ellipsis)
                elif isinstance(origin, type) and issubclass(origin, Mapping) and len(args) == 2:
                    nxt.append(args[1])
        current = nxt
    return [t for ann in current for t in _flatten(ann) if _is_model(t)]


def nested_models(model: type[BaseModel]) -> list[type[BaseModel]]:
    """``model`` and every pydantic model reachable through its field annotations (lists, dicts, unions)."""
    seen: list[type[BaseModel]] = []
    todo = [model]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.append(m)
        for f in m.model_fields.values():
            todo.extend(_annotation_models(f.annotation))
    return seen


def _annotation_models(annotation: Any) -> Iterator[type[BaseModel]]:
    for t in _flatten(annotation):
        if _is_model(t):
            yield t
        for arg in typing.get_args(t):
            yield from _annotation_models(arg)


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
