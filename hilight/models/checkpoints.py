"""Strict weight loading and saving.

Legacy ``.pt``/``.bin`` files are read with ``torch.load(weights_only=True)`` only; our own files are safetensors
with the resolved model config beside them. A load fails, naming every key, unless each key of the file maps onto
exactly one parameter of the model with the same shape. The only accepted differences are the explicit mappings
below, each of which is logged when used.

CLIP-ViP key mapping (``pretrain_clipvip_base_16.pt`` from microsoft/XPretrain and HiLight's fine-tuned
``lr1e-5_ft_*.pt``; reference §1.8 / hilight-reference §7.1):

1. ``module.`` — a DDP wrapper prefix (HiLight's fine-tuned files) — is stripped.
2. ``clipmodel.`` — the attribute of XPretrain's ``VidCLIP`` wrapper — is stripped. Every key must carry the same
   prefix; a file mixing layouts is rejected.
3. ``*.position_ids`` — persistent buffers in CLIP-ViP's code, non-persistent in ours — are dropped after checking
   that they hold ``arange`` (anything else means a different model).
4. With ``part="vision"`` (the VLM uses only the video tower) ``text_model.*`` and ``text_projection.*`` in the
   file are ignored and not required.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import shutil
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hilight.data.hashcache import HashCache
from hilight.models.clipvip import CLIPViPConfig, CLIPViPModel, build_clipvip

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TEXT_PREFIXES = ("text_model.", "text_projection.")


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not match the model; the message names the file and every bad key."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a legacy torch file (never unpickled beyond ``weights_only``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (a directory of ours holds {MODEL_FILE})")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except Exception as exc:  # safetensors raises its own error types for corrupt headers/truncation
            raise CheckpointError(f"checkpoint {path} is not a readable safetensors file ({exc}); "
                                  "it may be truncated — re-copy it") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"checkpoint {path} holds objects other than tensors; it is refused because loading "
                              f"it would run arbitrary code (weights_only=True): {str(exc).splitlines()[0]}") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"checkpoint {path} is truncated or not a torch file ({str(exc).splitlines()[0]}); "
                              "re-copy it") from exc
    # a trainer-style {"model": sd, "step": ..., "optimizer": ...} wrapper is unwrapped (documented mapping)
    wrapped = [k for k in ("model", "state_dict", "module") if isinstance(obj, dict) and isinstance(obj.get(k), dict)]
    if len(wrapped) == 1 and all(isinstance(v, torch.Tensor) for v in obj[wrapped[0]].values()):
        log.info("checkpoint %s: unwrapping its %r entry (ignoring %s)", path, wrapped[0],
                 sorted(k for k in obj if k != wrapped[0]) or "nothing else")
        obj = obj[wrapped[0]]
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} is not a state_dict of tensors (got {type(obj).__name__})")
    # OpenAI-CLIP-style files carry a few ints beside the tensors (build_model deletes them too)
    meta = {k for k in ("input_resolution", "context_length", "vocab_size") if not isinstance(obj.get(k, 0), torch.Tensor)}
    obj = {k: v for k, v in obj.items() if k not in meta}
    if other := sorted(k for k, v in obj.items() if not isinstance(v, torch.Tensor)):
        raise CheckpointError(f"checkpoint {path} is not a flat state_dict of tensors: {len(other)} entries are not "
                              f"tensors, e.g. {other[:5]}; save the model's state_dict() alone, or under one of "
                              "'model' / 'state_dict' / 'module'")
    return obj


def _strip_prefix(sd: dict[str, torch.Tensor], prefix: str, path: Path) -> dict[str, torch.Tensor]:
    with_prefix = [k for k in sd if k.startswith(prefix)]
    if not with_prefix:
        return sd
    if len(with_prefix) != len(sd):
        other = sorted(k for k in sd if not k.startswith(prefix))
        raise CheckpointError(f"checkpoint {path} mixes key layouts: {len(with_prefix)} keys start with {prefix!r} "
                              f"and {len(other)} do not, e.g. {other[:5]}")
    log.info("checkpoint %s: stripping prefix %r", path, prefix)
    return {k[len(prefix):]: v for k, v in sd.items()}


def _drop_position_ids(sd: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if k.endswith("position_ids"):
            if not torch.equal(v.reshape(-1).long(), torch.arange(v.numel())):
                raise CheckpointError(f"checkpoint {path}: buffer {k} is not arange({v.numel()}); "
                                      "this is not a CLIP-ViP checkpoint")
            continue
        out[k] = v
    return out


def clipvip_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The file's tensors under our parameter names (mappings 1–3 of the module docstring)."""
    path = Path(path)
    sd = read_state_dict(path)
    sd = _strip_prefix(sd, "module.", path)
    sd = _strip_prefix(sd, "clipmodel.", path)
    return _drop_position_ids(sd, path)


def load_strict(model: nn.Module, sd: dict[str, torch.Tensor], source: str, *,
                ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Copy ``sd`` into ``model``; fail listing every missing, unexpected or mis-shaped key.

    Keys starting with one of ``ignore_prefixes`` are neither loaded nor required."""
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(ignore_prefixes)}
    sd = {k: v for k, v in sd.items() if not k.startswith(ignore_prefixes)}
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(sd) & set(own) if sd[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                shown = ", ".join(items[:20]) + (f", ... ({len(items) - 20} more)" if len(items) > 20 else "")
                parts.append(f"{len(items)} {title}: {shown}")
        raise CheckpointError(f"checkpoint {source} does not match the model ({'; '.join(parts)}). "
                              "Check that the model preset matches the checkpoint (e.g. clipvip-b16 for ViP-B/16).")
    # every key was matched above; strict=False only lets the ignored prefixes stay as they are
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=False)


def load_clipvip_weights(model: nn.Module, path: str | Path, *, part: Literal["full", "vision"] = "full") -> None:
    """Load an original/HiLight ``.pt`` or one of our safetensors files into a ``CLIPViPModel``."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    sd = clipvip_state_dict(path)
    ignore = TEXT_PREFIXES if part == "vision" else ()
    if ignore:
        dropped = [k for k in sd if k.startswith(ignore)]
        log.info("checkpoint %s: ignoring %d text-tower keys (vision-only load)", path, len(dropped))
    load_strict(model, sd, str(path), ignore_prefixes=ignore)
    log.info("loaded %s into %s (%s, strict)", path, type(model).__name__, part)


@contextmanager
def replace_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``out_dir``; when the block succeeds it replaces ``out_dir`` in one
    rename, so a reader never sees a half-written export (a failed block leaves ``out_dir`` untouched)."""
    out_dir = Path(out_dir)
    tmp, old = out_dir.with_name(f".{out_dir.name}.tmp"), out_dir.with_name(f".{out_dir.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def save_model(model: nn.Module, out_dir: str | Path, config: dict) -> Path:
    """``out_dir/model.safetensors`` + ``out_dir/config.json``; written to a temp name first, then renamed."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{MODEL_FILE}.tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, tmp)
    tmp.replace(out_dir / MODEL_FILE)
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=1, sort_keys=True))
    return out_dir


def read_model_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{model_dir} is not a saved model directory: {CONFIG_FILE} is missing")
    return json.loads(path.read_text())


def weights_digest(path: str | Path) -> str:
    """Content hash of a weights file, or of a saved model directory's ``model.safetensors``; through the stat-keyed
    hash cache (``hilight.data.hashcache``), so an unchanged multi-GB file is not read again by every run."""
    path = Path(path)
    with HashCache() as cache:
        return cache.digest(path / MODEL_FILE if path.is_dir() else path)


def directory_digest(path: str | Path) -> str:
    """Content hash of every file under a directory (e.g. a transformers model dir: config, shards, tokenizer),
    each file's digest through the stat-keyed hash cache: a selection's locate steps read Gemma-2B's shards once,
    not once per step and run."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory")
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    with HashCache() as cache:
        digests = cache.digests(files)
    h = hashlib.sha256()
    for f, digest in zip(files, digests, strict=True):
        h.update(f"{f.relative_to(path)}|{digest}|".encode())
    return h.hexdigest()


def module_digest(state: nn.Module | dict[str, torch.Tensor]) -> str:
    """Content hash of loaded weights (names, dtypes, shapes, bytes): identifies what a model computes however
    its weights were obtained (file, export, random init)."""
    sd = state.state_dict() if isinstance(state, nn.Module) else state
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_saved_clipvip(model_dir: str | Path) -> CLIPViPModel:
    """A ``CLIPViPModel`` from a saved model directory or a training checkpoint (``model.safetensors`` plus a
    ``config.json`` whose ``model`` entry is the architecture), loaded strictly."""
    config = read_model_config(model_dir)
    if "model" not in config:
        raise CheckpointError(f"{Path(model_dir) / CONFIG_FILE} has no 'model' entry; it is not a CLIP-ViP export")
    model = build_clipvip(CLIPViPConfig.model_validate(config["model"]))
    load_clipvip_weights(model, model_dir)
    return model
