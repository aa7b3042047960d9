"""Probe + validate throughput: parallel vs sequential on the same synthetic clips, same run.

    python benchmarks/ingest.py --videos 500 --workers 2          # the demo's tiny clips (160x96, 30 frames)
    python benchmarks/ingest.py --realistic --videos 48 --workers 2 # 320x240, 12 s at 25 fps (300 frames)

Prints clips/s for each mode and the speed-up ratio (absolute times vary by machine; the ratio
is the number to compare). Append the printed line to benchmarks/RESULTS.md.

``--realistic`` renders ``--distinct`` clips with the synthetic generator at realistic sizes, then makes
``--videos`` files from them that differ in their bytes (an MP4 ``free`` box appended, which decoders skip), so
every file is really decoded; it times the prober alone (12 frames decoded per clip, no hash or probe cache): one
process vs ``--workers`` processes, and ``--workers`` threads beside them (whether the decoder releases the GIL),
the repeats interleaved so that load from other programs hits both sides alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import struct
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# hilight (pandas, pyarrow, PyAV) is imported inside the functions, not here: the prober's forkserver workers
# re-import the main module, and a heavy one would add seconds to every pool start (the `hilight` CLI's is light)


def measure(cfg, contracts, workers: int) -> tuple[float, float]:
    """(probe seconds, load+probe+validate seconds), from an empty hash and probe cache."""
    from hilight.data.hashcache import STATE_DIR_ENV
    from hilight.data.ingest import ProbeSettings, load_tables, probe_videos, validate_tables

    os.environ[STATE_DIR_ENV] = tempfile.mkdtemp(prefix="hilight-bench-state-")
    start = time.perf_counter()
    tables = load_tables(cfg)
    t_probe = time.perf_counter()
    tables.videos = probe_videos(tables.videos, ProbeSettings(workers=workers, decode_frames=12), progress=False)
    probe = time.perf_counter() - t_probe
    validation = validate_tables(tables, contracts)
    total = time.perf_counter() - start
    assert validation.quarantine.empty, "benchmark data should be clean"
    return probe, total


def free_box(tag: int) -> bytes:
    """An MP4 top-level ``free`` box: decoders skip it, so appending one gives new bytes that decode the same."""
    payload = f"hilight-benchmark-{tag}".encode()
    return struct.pack(">I", 8 + len(payload)) + b"free" + payload


def realistic_clips(out: Path, n: int, distinct: int, settings, workers: int) -> list[str]:
    """``n`` distinct files made from ``distinct`` rendered clips."""
    from hilight.data.synth import generate_dataset

    root = generate_dataset(out / "src", n_videos=distinct, seed=0, settings=settings, workers=workers, progress=False)
    sources = sorted((root / "videos").glob("*.mp4"))
    paths = []
    for i in range(n):
        path = out / "clips" / f"clip{i:05d}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(sources[i % len(sources)].read_bytes() + free_box(i))
        paths.append(str(path))
    return paths


def time_probe(paths: list[str], workers: int, threads: bool = False) -> float:
    """Seconds to probe ``paths`` (hash + decode 12 frames each, no cache)."""
    from hilight.data.probe import probe_files

    start = time.perf_counter()
    rows = probe_files(paths, workers=workers, decode_frames=12, progress=False,
                       executor="threads" if threads else "processes")
    assert rows["decodable"].all(), "benchmark clips should decode"
    return time.perf_counter() - start


def realistic(args: argparse.Namespace) -> None:
    from hilight.data.synth import SynthSettings

    settings = SynthSettings(width=args.width, height=args.height, fps=args.fps, duration_s=args.duration)
    with tempfile.TemporaryDirectory() as tmp:
        paths = realistic_clips(Path(tmp), args.videos, args.distinct, settings, args.workers)
        mib = sum(os.path.getsize(p) for p in paths) / args.videos / 2**20
        time_probe(paths[: 2 * args.workers], args.workers)  # warm-up: imports, forkserver, page cache
        time_probe(paths[: 2 * args.workers], 1)
        seq, par, thr = [], [], []
        for _ in range(args.repeats):
            seq.append(time_probe(paths, 1))
            par.append(time_probe(paths, args.workers))
            thr.append(time_probe(paths, args.workers, threads=True))
    n, s, p, t = args.videos, min(seq), min(par), min(thr)
    print(f"{n} clips {args.width}x{args.height}, {args.duration:g} s at {args.fps} fps ({mib:.2f} MiB each), 12 frames "
          f"decoded per clip, {platform.machine()} {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}: "
          f"1 process {s / n * 1000:.0f} ms/clip; {args.workers} processes x{s / p:.2f}; {args.workers} threads "
          f"x{s / t:.2f} (best of {args.repeats}; all runs: 1 process {_fmt(seq)} s, {args.workers} processes "
          f"{_fmt(par)} s, threads {_fmt(thr)} s)")
    print(f"parallel/sequential ratio: {s / p:.2f}")


def _fmt(xs: list[float]) -> str:
    return "/".join(f"{x:.2f}" for x in xs)


def main() -> None:
    from hilight.env import apply_offline_defaults

    apply_offline_defaults()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=500)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--realistic", action="store_true", help="realistic clip sizes; times the prober alone")
    ap.add_argument("--distinct", type=int, default=8, help="--realistic: clips rendered (files are copies of them)")
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--fps", type=int, default=25)
    ap.add_argument("--duration", type=float, default=12.0)
    args = ap.parse_args()
    if args.realistic:
        realistic(args)
        return
    from hilight.data.contracts import load_contracts
    from hilight.data.ingest import DatasetSpec, DataValidationConfig
    from hilight.data.synth import SynthSettings, generate_dataset

    with tempfile.TemporaryDirectory() as tmp:
        root = generate_dataset(Path(tmp) / "b", n_videos=args.videos, seed=0, settings=SynthSettings(),
                                workers=args.workers, progress=False)
        cfg = DataValidationConfig(datasets=[DatasetSpec(name="b", root=str(root), captions=["captions.json"], qa=["qa.json"])],
                                   progress=False)
        contracts = load_contracts(REPO / "data_contracts")
        # warm-up: imports, GE context, page cache, and the forkserver (started once per process)
        measure(cfg, contracts, 1)
        measure(cfg, contracts, args.workers)
        seq = [min(x) for x in zip(*(measure(cfg, contracts, 1) for _ in range(args.repeats)))]
        par = [min(x) for x in zip(*(measure(cfg, contracts, args.workers) for _ in range(args.repeats)))]
    n = args.videos
    print(f"{n} clips 160x96x30f, {platform.machine()} {os.cpu_count()} cores, {args.workers} workers vs 1: "
          f"probe {n / seq[0]:.0f} -> {n / par[0]:.0f} clips/s (x{seq[0] / par[0]:.2f}); "
          f"load+probe+validate {n / seq[1]:.0f} -> {n / par[1]:.0f} clips/s (x{seq[1] / par[1]:.2f})")


if __name__ == "__main__":
    main()
