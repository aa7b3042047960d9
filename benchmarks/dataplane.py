"""Data-plane work proportional to what changed: the stat-keyed hash cache and incremental validation, as ratios
measured in one run.

    python benchmarks/dataplane.py --files 20000     # fingerprint: cold vs warm vs warm after touching 1%
    python benchmarks/dataplane.py --clips 2000      # validation: full vs re-validation after +1% clips

``--files``: the script writes N small files of random bytes (``--file-kib`` each) into a dataset's video folder,
waits out the cache's racy window (the files are then "older" than the check, as data that arrived earlier is),
and fingerprints the tree three times with one cache: cold (empty cache: every file read), warm (nothing changed:
one ``stat`` per file), and warm after ``touch``-ing 1% of the files (those are read again; the fingerprint is
unchanged because it is content-based). Prints ``warm/cold ratio: X``.

``--clips``: N clips (copies of 8 synthetic clips, each made distinct by an MP4 ``free`` box; ``--clip-size tiny``:
64x48, 16 frames; ``realistic``: 320x240, 12 s at 25 fps) with one caption each; a full validation from an empty cache (hash + decode every clip), then 1% new clips and a
re-validation with the same cache (only the new clips are read and decoded). Both write the complete manifest and
quarantine. Prints ``revalidation/full ratio: X``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import struct
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _timed(fn, *args, **kwargs):
    """(result, wall seconds, CPU seconds of this process, threads included). On a shared machine the CPU time
    is the steadier of the two: other programs' load stretches wall time, not ours."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def fingerprints(n_files: int, file_kib: int, touch_fraction: float) -> None:
    import numpy as np

    from hilight.data import hashcache
    from hilight.data.hashcache import STATS
    from hilight.data.ingest import DatasetSpec, fingerprint_dataset

    with tempfile.TemporaryDirectory() as tmp:
        os.environ[hashcache.STATE_DIR_ENV] = str(Path(tmp) / "state")
        videos = Path(tmp) / "data" / "videos"
        rng = np.random.default_rng(0)
        files = []
        for i in range(n_files):  # 100 files per folder, as video datasets are sharded
            path = videos / f"{i // 100:04d}" / f"clip{i:06d}.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(rng.bytes(file_kib * 1024))
            files.append(path)
        time.sleep(hashcache.RACY_WINDOW_NS / 1e9 + 0.5)
        spec = DatasetSpec(name="bench", root=str(Path(tmp) / "data"))
        STATS.reset()
        cold_fp, cold, cold_cpu = _timed(fingerprint_dataset, spec)
        assert STATS.hashed == n_files, STATS
        STATS.reset()
        warm_fp, warm, warm_cpu = _timed(fingerprint_dataset, spec)
        assert warm_fp == cold_fp and STATS.hashed == 0, STATS
        touched = files[:: max(1, round(1 / touch_fraction))]
        for path in touched:
            os.utime(path)
        STATS.reset()
        touch_fp, after_touch, touch_cpu = _timed(fingerprint_dataset, spec)
        assert touch_fp == cold_fp and STATS.hashed == len(touched), STATS
    mib = n_files * file_kib / 1024
    print(f"{n_files} files x {file_kib} KiB ({mib:.0f} MiB), {platform.machine()} {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}: cold {cold:.2f} s, warm {warm:.3f} s, warm after touching {len(touched)} "
          f"({len(touched) / n_files:.0%}) {after_touch:.3f} s (ratio {after_touch / cold:.3f}); CPU time: cold "
          f"{cold_cpu:.2f} s, warm {warm_cpu:.3f} s (ratio {warm_cpu / cold_cpu:.3f}), after touching {touch_cpu:.3f} s "
          f"(ratio {touch_cpu / cold_cpu:.3f}); same fingerprint all three")
    print(f"warm/cold ratio: {warm / cold:.3f}")


def _free_box(tag: int) -> bytes:
    payload = f"hilight-benchmark-{tag}".encode()
    return struct.pack(">I", 8 + len(payload)) + b"free" + payload


def _add_clips(root: Path, sources: list[Path], start: int, n: int) -> None:
    caps_path = root / "captions.json"
    caps = json.loads(caps_path.read_text()) if caps_path.exists() else []
    for i in range(start, start + n):
        name = f"{i // 100:04d}/clip{i:06d}.mp4"
        path = root / "videos" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(sources[i % len(sources)].read_bytes() + _free_box(i))
        caps.append({"video": name, "captions": [{"caption": f"clip {i} on a pool table"}]})
    caps_path.write_text(json.dumps(caps))


CLIP_SIZES = {"tiny": dict(width=64, height=48, fps=8, duration_s=2.0),  # the tests' clips: 16 frames
              "realistic": dict(width=320, height=240, fps=25, duration_s=12.0)}  # 300 frames


def revalidation(n_clips: int, workers: int, new_fraction: float, clip_size: str) -> None:
    from hilight.data import hashcache
    from hilight.data.contracts import load_contracts
    from hilight.data.hashcache import STATS
    from hilight.data.ingest import DataValidationConfig, run_ingest
    from hilight.data.synth import SynthSettings, generate_dataset

    with tempfile.TemporaryDirectory() as tmp:
        os.environ[hashcache.STATE_DIR_ENV] = str(Path(tmp) / "state")
        settings = SynthSettings(**CLIP_SIZES[clip_size])
        src = generate_dataset(Path(tmp) / "src", n_videos=8, seed=0, progress=False, settings=settings)
        sources = sorted((src / "videos").glob("*.mp4"))
        root = Path(tmp) / "data"
        _add_clips(root, sources, 0, n_clips)
        time.sleep(hashcache.RACY_WINDOW_NS / 1e9 + 0.5)
        cfg = DataValidationConfig.model_validate({
            "datasets": [{"name": "bench", "root": str(root), "captions": ["captions.json"]}],
            "output_dir": str(Path(tmp) / "out"), "progress": False, "probe": {"workers": workers}})
        contracts = load_contracts(REPO / "data_contracts")
        STATS.reset()
        _, full, full_cpu = _timed(run_ingest, cfg, contracts)
        assert STATS.probed == n_clips, STATS
        n_new = max(1, round(n_clips * new_fraction))
        _add_clips(root, sources, n_clips, n_new)
        STATS.reset()
        again, incremental, incremental_cpu = _timed(run_ingest, cfg, contracts)
        assert STATS.probed == n_new and again.counts["videos_accepted"] == n_clips + n_new, (STATS, again.counts)
    size = f"{settings.width}x{settings.height}, {int(settings.fps * settings.duration_s)} frames"
    print(f"{n_clips} {clip_size} clips ({size}), {workers} probe workers, {platform.machine()} {os.cpu_count()} "
          f"cores, load average {os.getloadavg()[0]:.1f}: full validation {full:.2f} s ({n_clips} decoded), "
          f"re-validation after +{n_new} clips ({new_fraction:.0%}) {incremental:.2f} s ({n_new} decoded, "
          f"{n_clips + n_new} rows in the manifest); CPU time of this process (probe workers not included) "
          f"{full_cpu:.2f} s vs {incremental_cpu:.2f} s")
    print(f"revalidation/full ratio: {incremental / full:.3f}")


def main() -> None:
    from hilight.env import apply_offline_defaults

    apply_offline_defaults()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, help="fingerprint benchmark over this many small files")
    ap.add_argument("--file-kib", type=int, default=16)
    ap.add_argument("--clips", type=int, help="re-validation benchmark over this many tiny clips")
    ap.add_argument("--clip-size", choices=sorted(CLIP_SIZES), default="tiny")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--fraction", type=float, default=0.01, help="files touched / clips added")
    args = ap.parse_args()
    if not args.files and not args.clips:
        ap.error("give --files N and/or --clips N")
    if args.files:
        fingerprints(args.files, args.file_kib, args.fraction)
    if args.clips:
        revalidation(args.clips, args.workers, args.fraction, args.clip_size)


if __name__ == "__main__":
    main()
