"""Training checkpoints: everything needed to continue a run bit-for-bit, written atomically.

Layout of ``<run_dir>/checkpoints/step-00000100/``::

    model.safetensors    model state (safetensors)
    optimizer.pt         optimizer state_dict (tensors + plain values; read back with weights_only=True)
    deepspeed/           instead of optimizer.pt under DeepSpeed: the engine's checkpoint (each process's partition)
    rng.safetensors      torch CPU (and CUDA) generator states (of the main process)
    rng-00001.safetensors ...  the same for each other process of a multi-process run, its Python/NumPy states in
                         the file's metadata (dropout draws a different number of values on each rank, so the
                         ranks' generators drift apart and each must be resumed from its own)
    trainer_state.json   step, epoch, sampler position, scheduler state, Python/NumPy RNG, counters, history
    config.json          the resolved run config

A checkpoint is written into a hidden temporary directory and renamed into place, so a directory named
``step-*`` is always complete; a kill mid-write leaves only a temporary directory, removed on the next save.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return sorted(found)


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    np_state = np.random.get_state()
    plain = {"python": _jsonable(random.getstate()),
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return tensors, plain


def process_rng_file(rank: int) -> str:
    return f"rng-{rank:05d}.safetensors"


def restore_rng(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted((int(k.rsplit("_", 1)[1]), v) for k, v in tensors.items() if k.startswith("torch_cuda_"))
    cuda = [v for _, v in cuda]  # by device number: "torch_cuda_10" sorts before "torch_cuda_2" as text
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    py = plain["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, *rest = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU tensors safetensors can write: tied weights (e.g. Gemma's lm_head = embed_tokens) share storage, which
    safetensors refuses, so every repeat is cloned; loading writes the same values to both names."""
    seen, out = set(), {}
    for k, v in state.items():
        t = v.detach().cpu()
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t.contiguous()
    return out


def save_checkpoint(root: Path, step: int, *, model_state: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer | None, trainer_state: dict[str, Any], config: dict[str, Any],
                    directories: dict[str, Path] | None = None,
                    process_rng: list[tuple[dict[str, torch.Tensor], dict[str, Any]]] | None = None) -> Path:
    """Write checkpoint ``step`` atomically; returns its directory. ``optimizer=None``: its state is kept
    elsewhere, e.g. in DeepSpeed's own checkpoint, a directory already written that ``directories`` (name →
    path) moves in before the checkpoint is marked complete. ``process_rng``: every process's ``rng_state()``,
    gathered on the main process, in rank order (default: this process's alone)."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step-*"):  # left by a process killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    tmp.mkdir()
    save_file(unshared(model_state), tmp / "model.safetensors")
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    for name, path in (directories or {}).items():
        os.replace(path, tmp / name)
    (rng_tensors, rng_plain), *others = process_rng or [rng_state()]
    save_file(rng_tensors, tmp / "rng.safetensors")
    for rank, (tensors, plain) in enumerate(others, start=1):
        save_file(tensors, tmp / process_rng_file(rank), metadata={"plain": json.dumps(plain)})
    (tmp / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True, default=str))
    # the state file is written last: its presence marks a complete checkpoint
    (tmp / STATE_FILE).write_text(json.dumps({**trainer_state, "step": step, "rng": rng_plain}, indent=1))
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    final = step_dir(root, step)
    if final.exists():  # the same step saved again after a resume
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    return final


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's model state alone (no optimizer or RNG state is touched)."""
    return load_file(path / "model.safetensors")


def load_checkpoint(path: Path, optimizer: torch.optim.Optimizer | None, *,
                    rank: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model state, trainer state); restores the optimizer and process ``rank``'s RNG states in place."""
    model_state = load_weights(path)
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    state = json.loads((path / STATE_FILE).read_text())
    own = path / process_rng_file(rank)
    if rank == 0:
        restore_rng(load_file(path / "rng.safetensors"), state["rng"])
    elif own.is_file():
        with safe_open(own, "pt") as f:
            plain = json.loads(f.metadata()["plain"])
        restore_rng(load_file(own), plain)
    else:  # saved by fewer processes: this one starts its stream afresh, as it did at step 0
        log.warning("%s holds no RNG state for process %d (saved by fewer processes, or before each process's "
                    "state was saved); its random draws (dropout) will not continue the saved run's", path, rank)
    return model_state, state


def prune_checkpoints(root: Path, keep_last: int, protect: set[int] = frozenset(), keep_every: int | None = None) -> None:
    """Delete all but the newest ``keep_last`` checkpoints, never one whose step is in ``protect`` (e.g. the best)
    or a multiple of ``keep_every``."""
    ckpts = list_checkpoints(root)
    for step, path in ckpts[:max(len(ckpts) - keep_last, 0)]:
        if step not in protect and not (keep_every and step % keep_every == 0):
            shutil.rmtree(path)
            log.debug("removed checkpoint %s", path)
