"""Probe + validate throughput: parallel vs sequential on the same synthetic clips, same run.

    python benchmarks/ingest.py --videos 500 --workers 2

Prints clips/s for each mode and the speed-up ratio (absolute times vary by machine; the ratio
is the number to compare). Append the printed line to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from hilight.data.contracts import load_contracts
from hilight.data.ingest import DatasetSpec, DataValidationConfig, ProbeSettings, load_tables, probe_videos, validate_tables
from hilight.data.synth import SynthSettings, generate_dataset
from hilight.env import apply_offline_defaults

REPO = Path(__file__).resolve().parents[1]


def measure(cfg: DataValidationConfig, contracts, workers: int) -> tuple[float, float]:
    """(probe seconds, load+probe+validate seconds)."""
    start = time.perf_counter()
    tables = load_tables(cfg)
    t_probe = time.perf_counter()
    tables.videos = probe_videos(tables.videos, ProbeSettings(workers=workers, decode_frames=12), progress=False)
    probe = time.perf_counter() - t_probe
    validation = validate_tables(tables, contracts)
    total = time.perf_counter() - start
    assert validation.quarantine.empty, "benchmark data should be clean"
    return probe, total


def main() -> None:
    apply_offline_defaults()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=500)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
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
