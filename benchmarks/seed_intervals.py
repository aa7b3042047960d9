"""How often a paired interval calls two equally good candidates different, when each candidate is trained with
several seeds and the runs scatter; and how often it finds a real gap. Three intervals over the same simulated
(seed, item) cells: every cell treated as an independent item (what the selection did before), the crossed
seed x item bootstrap alone, and that bootstrap widened to the Student-t interval over per-seed values (what
``hilight.experiments.bootstrap`` now does with ``seeds:``). Pure simulation, CPU, 10-15 minutes on 2 cores.

    python benchmarks/seed_intervals.py [--sims 200] [--items 200]

Each candidate's run at a seed has accuracy ``0.5 + u`` (``u`` ~ N(0, run_sd): the training draw), and each of
``items`` checks is a Bernoulli draw at that accuracy. "false" = share of equal pairs whose 95% interval excludes 0
(nominal 0.05); "found" = share of pairs 0.65 vs 0.5 whose interval lies above 0.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from hilight.experiments.bootstrap import paired_ratio_difference


def runs(rng: np.random.Generator, mean: float, run_sd: float, seeds: int, items: int) -> pd.DataFrame:
    p = np.clip(mean + rng.normal(0.0, run_sd, seeds), 0.01, 0.99)
    num = (rng.random((seeds, items)) < p[:, None]).astype(float).ravel()
    index = pd.MultiIndex.from_product([range(seeds), range(items)], names=["seed", "item"])
    return pd.DataFrame({"num": num, "den": 1.0}, index=index)


def as_items(x: pd.DataFrame) -> pd.DataFrame:
    return x.reset_index("seed", drop=True).reset_index(drop=True)


METHODS = {
    "cells as items": lambda a, b, n: paired_ratio_difference(as_items(a), as_items(b), n=n),
    "crossed": lambda a, b, n: paired_ratio_difference(a, b, n=n, small_sample=False),
    "crossed + t": lambda a, b, n: paired_ratio_difference(a, b, n=n),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sims", type=int, default=200)
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--boot", type=int, default=1000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    print(f"{args.sims} simulated pairs per row, {args.items} items, {args.boot} resamples, 95% intervals\n")
    names = list(METHODS)
    print("| seeds | run sd | " + " | ".join(f"false: {m}" for m in names) + " | "
          + " | ".join(f"found: {m}" for m in names) + " |")
    print("|---|---|" + "---|" * 2 * len(names))
    for seeds, run_sd in [(2, 0.0), (2, 0.1), (3, 0.0), (3, 0.05), (3, 0.1), (5, 0.1), (10, 0.1)]:
        false, found = dict.fromkeys(names, 0), dict.fromkeys(names, 0)
        for _ in range(args.sims):
            same = runs(rng, 0.5, run_sd, seeds, args.items), runs(rng, 0.5, run_sd, seeds, args.items)
            gap = runs(rng, 0.65, run_sd, seeds, args.items), runs(rng, 0.5, run_sd, seeds, args.items)
            for m, fn in METHODS.items():
                d = fn(*same, args.boot)
                false[m] += d.low > 0 or d.high < 0
                found[m] += fn(*gap, args.boot).low > 0
        s = args.sims
        print(f"| {seeds} | {run_sd} | " + " | ".join(f"{false[m] / s:.3f}" for m in names) + " | "
              + " | ".join(f"{found[m] / s:.3f}" for m in names) + " |")
    print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
