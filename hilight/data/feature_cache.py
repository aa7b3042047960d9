"""Frozen-tower feature cache: the towers' outputs for each video, computed once and reused every epoch.

In stages 1–2 both vision towers are frozen, so decoding a clip and running CLIP-ViP + Long-CLIP on it gives the
same tensors every epoch. The cache stores them as safetensors shards under ``<root>/<key>/``, where ``key`` hashes
everything the features depend on: each tower's weights (a digest of the loaded tensors, so any change of weights
or loader shows) and settings, the frame sampling (frame count, image size, sampler, resize, normalisation), the
source of the decoding and tower code, the versions of torch, transformers and the decoders, and the stored dtype
(``hilight.train.vlm_parts.feature_cache_key``). A change of any of them lands in a new directory, so stale
features are never read; ``key.json`` in each directory says what it was computed from.

Old directories are never read again but stay until pruned: at Valley-703K scale one directory is terabytes (about
3.5 MiB per clip in bf16), and every retrain that produces new vision weights adds one. Each open stamps
``<dir>/last_used``; :func:`cache_dirs` lists the directories with their size and last use, and
:func:`prune_cache_dirs` (``hilight cache prune``) removes those beyond the most recently used ones.

Entries are keyed by the video file's SHA-256 (from the validated manifest), so the same clip under two datasets
is computed once. Each shard is written to a temporary name and renamed, so a killed extraction leaves only whole
shards; the next run computes what is missing. Reads are memory-mapped (``safe_open``), one handle per shard and
process, which also works in DataLoader workers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from hilight.data.frames import load_clip_frames

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the layout or the meaning of an entry changes
KEY_FILE, USED_FILE = "key.json", "last_used"


class FeatureCache:
    def __init__(self, root: str | Path, key: dict, *, dtype: torch.dtype = torch.float32):
        self.key = {"version": CACHE_VERSION, "dtype": str(dtype).removeprefix("torch."), **key}
        self.digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = Path(root) / self.digest
        self.dtype = dtype
        self.dir.mkdir(parents=True, exist_ok=True)
        key_file = self.dir / KEY_FILE
        if not key_file.is_file():
            tmp = key_file.with_name(f".key.{uuid.uuid4().hex}.tmp")
            tmp.write_text(json.dumps(self.key, indent=1, sort_keys=True))
            tmp.replace(key_file)
        (self.dir / USED_FILE).touch()  # its mtime: when a run last opened this directory (for pruning)
        self._index: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        self.refresh()

    def refresh(self) -> None:
        """Re-read which videos the shards on disk hold (after another process wrote some)."""
        self._index.clear()
        for shard in sorted(self.dir.glob("shard-*.safetensors")):
            with safe_open(str(shard), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open has keys(), not iteration)
                    self._index[name.split("/", 1)[0]] = shard

    def __contains__(self, video_sha: str) -> bool:
        return video_sha in self._index

    def __len__(self) -> int:
        return len(self._index)

    def missing(self, video_shas: Iterable[str]) -> list[str]:
        return sorted({s for s in video_shas if s not in self._index})

    def put(self, entries: dict[str, dict[str, torch.Tensor]], *, writer: str = "") -> Path:
        """Write one shard holding ``{video_sha: {name: tensor}}`` atomically; ``writer`` (e.g. ``p3``, the process
        that computed it) goes into the shard's name."""
        tensors = {f"{sha}/{name}": t.detach().to("cpu", self.dtype).clone()  # own storage: no shared views
                   for sha, named in entries.items() for name, t in named.items()}
        shard = self.dir / f"shard-{writer + '-' if writer else ''}{uuid.uuid4().hex}.safetensors"
        tmp = shard.with_name(f".{shard.name}.tmp")
        save_file(tensors, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        tmp.replace(shard)
        for sha in entries:
            self._index[sha] = shard
        return shard

    def get(self, video_sha: str, names: tuple[str, ...]) -> list[torch.Tensor]:
        shard = self._index.get(video_sha)
        if shard is None:
            raise KeyError(f"video {video_sha[:12]}… is not in the feature cache {self.dir}; run the extraction first")
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = safe_open(str(shard), framework="pt")
        return [handle.get_tensor(f"{video_sha}/{n}") for n in names]

    def __getstate__(self) -> dict:  # DataLoader workers open their own handles
        return {**self.__dict__, "_handles": {}}


def fill_cache(cache: FeatureCache, videos: dict[str, str], encode: Callable[[torch.Tensor], dict[str, torch.Tensor]], *,
               num_frames: int, image_size: int, batch_size: int = 8, shard_size: int = 256,
               progress: bool = True, writer: str = "") -> dict[str, int]:
    """Compute and store the features of every video in ``{sha: file}`` not yet cached.

    ``encode`` maps a clip batch ``[B, T, 3, S, S]`` to named per-video tensors ``{name: [B, ...]}``. Returns
    counts (``cached`` before, ``computed`` now). Several processes may fill one cache at once, each its own
    videos: shards are written under unique names (``writer`` in them)."""
    todo = cache.missing(videos)
    stats = {"cached": len(videos) - len(todo), "computed": len(todo)}
    if not todo:
        return stats
    log.info("feature cache %s: computing %d of %d videos", cache.dir, len(todo), len(videos))
    pending: dict[str, dict[str, torch.Tensor]] = {}
    bar = tqdm(total=len(todo), desc="features", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(todo), batch_size):
        shas = todo[start:start + batch_size]
        clips = torch.stack([load_clip_frames(videos[s], num_frames, image_size) for s in shas])
        with torch.no_grad():
            out = encode(clips)
        for i, sha in enumerate(shas):
            pending[sha] = {name: t[i] for name, t in out.items()}
        if len(pending) >= shard_size:
            cache.put(pending, writer=writer)
            pending = {}
        bar.update(len(shas))
    if pending:
        cache.put(pending, writer=writer)
    bar.close()
    return stats


# ------------------------------------------------------------------------------------------------ housekeeping


@dataclass(frozen=True)
class CacheDir:
    """One key directory under a cache root."""

    path: Path
    key: dict  # what its features were computed from (key.json)
    last_used: float  # when a run last opened it (epoch seconds; key.json's mtime for directories never stamped)
    shards: int
    bytes: int

    @property
    def digest(self) -> str:
        return self.path.name


def cache_dirs(root: str | Path) -> list[CacheDir]:
    """The feature-cache directories under ``root``, most recently used first. Only directories holding a
    ``key.json`` count: anything else under ``root`` is not the cache's and is left alone."""
    found = []
    for d in sorted(Path(root).iterdir()) if Path(root).is_dir() else []:
        key_file = d / KEY_FILE
        if d.name.startswith(".") or not key_file.is_file():  # ".deleting-…": a prune under way
            continue
        used = d / USED_FILE
        files = [f for f in d.iterdir() if f.is_file()]
        found.append(CacheDir(d, json.loads(key_file.read_text()),
                              (used if used.is_file() else key_file).stat().st_mtime,
                              sum(f.name.startswith("shard-") and f.suffix == ".safetensors" for f in files),
                              sum(f.stat().st_size for f in files)))
    return sorted(found, key=lambda c: c.last_used, reverse=True)


def prune_cache_dirs(root: str | Path, *, keep: int | None = None, unused_days: float | None = None,
                     dry_run: bool = False, now: float | None = None) -> list[CacheDir]:
    """Delete the cache directories under ``root`` that are not among the ``keep`` most recently used and (with
    ``unused_days``) were not used for that many days; with both, a directory goes only when both say so. Returns
    what was (with ``dry_run``: would be) deleted.

    A directory is renamed away first and deleted after, so a run that opens the same key meanwhile starts a fresh
    directory instead of reading one half gone. A run that is reading a directory while it is deleted fails on its
    next shard: prune directories no running job uses (``keep`` >= 1 keeps the latest one)."""
    if keep is None and unused_days is None:
        raise ValueError("say what to keep: keep=N (the N most recently used directories) and/or unused_days=D "
                         "(directories used in the last D days)")
    if keep is not None and keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}")
    if unused_days is not None and unused_days < 0:
        raise ValueError(f"unused_days must be >= 0, got {unused_days}")
    now = time.time() if now is None else now
    dirs = cache_dirs(root)
    doomed = [c for i, c in enumerate(dirs)
              if (keep is None or i >= keep) and (unused_days is None or now - c.last_used > unused_days * 86400)]
    if not dry_run:
        for c in doomed:
            trash = c.path.with_name(f".deleting-{c.path.name}-{uuid.uuid4().hex[:8]}")
            c.path.rename(trash)
            shutil.rmtree(trash)
            log.info("feature cache: deleted %s (%d shards, %.1f MiB)", c.path, c.shards, c.bytes / 2**20)
    return doomed
