"""Video probing: where a referenced file is, whether it is safe to open, and what decord sees.

Probing decodes the frames the training sampler will actually take (``np.linspace`` over the
clip, as the HiLight reference does), so "decodable" means "the dataloader will not fail on it",
not merely "has a header". Files are probed in worker processes: decoding is CPU-bound and a
crashing decoder must not take the pipeline down.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from hilight.data.hashcache import STATS, HashCache, sha256_file

VIDEO_SUFFIXES = {".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v"}
ARRAY_SUFFIXES = {".npy"}
PICKLE_SUFFIXES = {".pkl", ".pickle"}
PROBE_COLUMNS = ["path_error", "is_pickle", "exists", "size_bytes", "decodable", "probe_error", "n_frames",
                 "fps", "width", "height", "min_side", "max_side", "duration_s", "sha256"]
DECODE_FACTS = ("decodable", "probe_error", "n_frames", "fps", "width", "height", "duration_s")
# Bump when what ``_decode_facts`` records changes: cached probe results are keyed by it (and the decord version).
PROBER_VERSION = "1"


def resolve_video_path(root: Path, video_dir: str | Path, ref: str) -> tuple[Path | None, str | None]:
    """Absolute path of a referenced video, or an error if the reference leaves the data root.

    Rejected: absolute paths, any ``..`` component, and paths (symlinks included) that resolve
    outside ``root``.
    """
    if not ref:
        return None, "empty video path"
    if os.path.isabs(ref) or Path(ref).is_absolute():
        return None, f"absolute path {ref!r}"
    if ".." in Path(ref).parts:
        return None, f"path {ref!r} contains '..'"
    root = Path(root).resolve()
    candidate = root / video_dir / ref
    try:
        resolved = candidate.resolve()
    except (OSError, RuntimeError) as exc:  # symlink loops
        return None, f"cannot resolve {ref!r}: {exc}"
    if not resolved.is_relative_to(root):
        return None, f"{ref!r} resolves to {resolved}, outside the data root {root} (symlink?)"
    return candidate, None


def frame_indices(n_frames: int, num: int, *, jitter: np.random.Generator | None = None) -> np.ndarray:
    """``num`` indices spread uniformly over ``n_frames``, first and last included, truncated to int as the
    reference's ``linspace(0, n-1, 12).astype(int)``; with ``jitter`` each index moves within its segment
    (CLIP-ViP's training-time jitter), drawn from the given generator so it is reproducible. Training decodes the
    same frames (``hilight.data.frames``)."""
    if n_frames < 1:
        raise ValueError("video has no frames")
    idx = np.linspace(0, n_frames - 1, num)
    if jitter is not None and n_frames > num:
        half = (n_frames - 1) / max(num - 1, 1) / 2
        idx = idx + jitter.uniform(-half, half, size=num)
    return np.clip(idx, 0, n_frames - 1).astype(np.int64)


def probe_file(path: str | None, decode_frames: int = 12) -> dict:
    """Facts about one file (``PROBE_COLUMNS``). Never raises for a bad file: the error is a fact."""
    out, _ = _file_facts(path)
    if _needs_decoding(out):
        out["sha256"] = sha256_file(Path(path))
        out.update(_decode_facts(path, decode_frames))
    return _with_sides(out)


def _file_facts(path: str | None) -> tuple[dict, os.stat_result | None]:
    """What a ``stat`` says (no byte is read), and the stat itself for the hash cache."""
    out = dict.fromkeys(PROBE_COLUMNS)
    if not isinstance(path, str):  # unresolvable reference: the resolver's path_error says why
        return out, None
    p = Path(path)
    out["is_pickle"] = p.suffix.lower() in PICKLE_SUFFIXES
    out["exists"] = p.is_file()
    if not out["exists"]:
        return out, None
    st = p.stat()
    out["size_bytes"] = st.st_size
    return out, st


def _needs_decoding(facts: dict) -> bool:
    """An existing, non-empty file that is not a pickle (pickles are never opened; empty files have nothing)."""
    return bool(facts["exists"]) and not facts["is_pickle"] and facts["size_bytes"] > 0


def _decode_facts(path: str, decode_frames: int) -> dict:
    """``DECODE_FACTS`` of one file: a function of its bytes and suffix only, so it can be cached by content."""
    p = Path(path)
    suffix = p.suffix.lower()
    out = dict.fromkeys(DECODE_FACTS)
    try:
        if suffix in ARRAY_SUFFIXES:
            out.update(_probe_array(p))
        elif suffix in VIDEO_SUFFIXES:
            out.update(_probe_video(p, decode_frames))
        else:
            raise ValueError(f"unsupported extension {suffix!r}; expected one of {sorted(VIDEO_SUFFIXES | ARRAY_SUFFIXES)}")
        out["decodable"] = True
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the fact we record, with its message
        out["decodable"] = False
        out["probe_error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
    return out


def _with_sides(out: dict) -> dict:
    if out["width"] is not None and out["height"] is not None:
        out["min_side"], out["max_side"] = min(out["width"], out["height"]), max(out["width"], out["height"])
    return out


def _probe_video(path: Path, decode_frames: int) -> dict:
    import decord

    vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    n = len(vr)
    if n == 0:
        raise ValueError("video has no frames")
    fps = float(vr.get_avg_fps())
    if decode_frames > 0:
        frames = vr.get_batch(frame_indices(n, decode_frames).tolist()).asnumpy()
        height, width = frames.shape[1:3]
    else:
        height, width = vr[0].shape[:2]
    return {"n_frames": n, "fps": fps, "width": int(width), "height": int(height),
            "duration_s": n / fps if fps > 0 else None}


def _probe_array(path: Path) -> dict:
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    if arr.ndim != 4 or 3 not in (arr.shape[1], arr.shape[3]):
        raise ValueError(f"array must be [T,3,H,W] or [T,H,W,3], got shape {list(arr.shape)}")
    t, h, w = (arr.shape[0], arr.shape[2], arr.shape[3]) if arr.shape[1] == 3 else arr.shape[:3]
    return {"n_frames": int(t), "fps": None, "width": int(w), "height": int(h), "duration_s": None}


def _probe_job(args: tuple[str, int]) -> dict:
    return _decode_facts(*args)


def _worker_context() -> mp.context.BaseContext:
    """forkserver: workers fork from a clean server process (never from a parent holding DB
    connections or threads), and the server imports numpy/decord once instead of once per worker."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["hilight.data.probe", "decord"])
    return ctx


def prober_version() -> str:
    """What a cached probe result depends on besides the file and the settings: this prober and the decoder."""
    from importlib.metadata import version

    return f"hilight-probe-{PROBER_VERSION}/decord-{version('decord')}"


def probe_files(paths: list[str | None], *, workers: int = 2, decode_frames: int = 12, progress: bool = True,
                cache: HashCache | None = None, executor: str = "processes") -> pd.DataFrame:
    """Probe ``paths`` (None = unresolvable); one row per path, same order.

    Every file is ``stat``-ed; files to decode are content-hashed (through ``cache`` when given, so unchanged
    files are not read) and decoded by ``workers`` workers, once per distinct (content, suffix). With ``cache``,
    decode results are also looked up and stored by (content hash, suffix, ``decode_frames``, prober version):
    only new or changed files are decoded.

    ``executor``: ``"processes"`` (default) isolates the decoder: a crash in FFmpeg on a hostile file kills one
    worker, not the run. ``"threads"`` starts nothing (decord calls FFmpeg through ctypes, which releases the GIL,
    so threads decode in parallel), faster on small batches (``benchmarks/ingest.py --realistic``), but a decoder
    crash then ends the process.
    """
    rows, stats = map(list, zip(*(_file_facts(p) for p in paths))) if paths else ([], [])
    todo = [i for i, r in enumerate(rows) if _needs_decoding(r)]
    if cache is not None:
        digests = cache.digests([Path(paths[i]) for i in todo], [stats[i] for i in todo])
    else:
        with ThreadPoolExecutor(max(1, min(4, len(todo)))) as pool:
            digests = list(pool.map(lambda i: sha256_file(Path(paths[i])), todo))
    keys = {}
    for i, digest in zip(todo, digests):
        rows[i]["sha256"] = digest
        keys[i] = (digest, Path(paths[i]).suffix.lower())
    settings, prober = json.dumps({"decode_frames": decode_frames}), prober_version()
    known = cache.probe_facts(list(keys.values()), settings, prober) if cache is not None else {}
    first_path = {}
    for i, key in keys.items():
        if key not in known:
            first_path.setdefault(key, paths[i])  # the same bytes under the same suffix decode once
    jobs = [(path, decode_frames) for path in first_path.values()]
    bar = dict(total=len(jobs), desc="probe videos", unit="file", disable=not progress)
    if executor not in ("processes", "threads"):
        raise ValueError(f"executor must be 'processes' or 'threads', got {executor!r}")
    if workers > 1 and len(jobs) > 1 and executor == "threads":
        with ThreadPoolExecutor(min(workers, len(jobs))) as threads:
            decoded = list(tqdm(threads.map(_probe_job, jobs), **bar))
    elif workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=_worker_context()) as pool:
            chunk = max(1, min(16, len(jobs) // (workers * 8)))
            decoded = list(tqdm(pool.map(_probe_job, jobs, chunksize=chunk), **bar))
    else:
        decoded = [_probe_job(j) for j in tqdm(jobs, **bar)]
    fresh = dict(zip(first_path, decoded))
    if cache is not None:
        cache.store_probe_facts([(sha, suffix, facts) for (sha, suffix), facts in fresh.items()], settings, prober)
    hits = sum(key in known for key in keys.values())
    (cache.count if cache is not None else STATS.add)(probed=len(jobs), probe_hits=hits)
    for i, key in keys.items():
        rows[i].update(known.get(key) or fresh[key])
    return pd.DataFrame([_with_sides(r) for r in rows], columns=PROBE_COLUMNS)
