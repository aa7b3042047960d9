"""Bootstrap intervals for the comparisons an experiment decides on (Efron & Tibshirani, percentile method).

Every metric the experiments compare is a ratio of sums over evaluation items: a fact accuracy pools checks
(sum of correct / sum of checks), a caption top-1 accuracy averages clips (sum of hits / number of clips). Each
item therefore contributes a numerator and a denominator (``num``, ``den``), and the metric over any resample of
items is ``sum(num) / sum(den)``. Resampling items, not answers or checks, keeps the items' internal correlation.

A paired interval resamples the same items for both models: the difference of two models scored on the same clips
is much tighter than two separate intervals suggest, which is what a promotion margin needs.

Several training seeds. When the items carry a ``seed`` index level with two or more seeds (an ablation or a
selection run with ``seeds:``), each row is one (seed, item) cell, and the clips are not the only source of
variance: one training run can land far from the next (on the demo, stage-2 runs of one recipe read the ball
colours anywhere between chance and 0.65, benchmarks/RESULTS.md). Resampling the cells as if they were independent
items would treat three runs of 200 clips as 600 clips and say nothing of the run-to-run spread. So seeds and items
are resampled independently of each other and crossed, every cell weighted by (its seed's count) x (its item's
count): Owen's two-factor ("pigeonhole") bootstrap for crossed random effects (Owen 2007, Ann. Appl. Stat.; the
same idea as resampling runs and tasks in Agarwal et al. 2021, "Deep RL at the edge of the statistical precipice").
It is mildly conservative. With few seeds the interval is wide, as it should be: three seeds say little about a
fourth. Hand-written because scipy.stats.bootstrap resamples one axis of independent observations, not two
crossed factors of ratio sums.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Interval:
    """A point estimate with its two-sided bootstrap interval at ``confidence`` over ``items`` resampled units."""

    estimate: float
    low: float
    high: float
    confidence: float
    items: int  # resampled items (clips, questions)
    seeds: int = 1  # training seeds resampled as well (crossed with the items), when more than one

    def as_dict(self) -> dict:
        return asdict(self)

    def overlaps(self, other: Interval) -> bool:
        return not (self.low > other.high or other.low > self.high)

    def text(self, digits: int = 3) -> str:
        if math.isnan(self.estimate):
            return "n/a"
        return (f"{self.estimate:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}] "
                f"({self.confidence:.0%}, n={self.items}{seeds_text(self.seeds)})")


def seeds_text(seeds: int) -> str:
    """`` x 3 seeds`` when an interval resampled several training seeds, else nothing."""
    return f" × {seeds} seeds" if seeds > 1 else ""


NAN = float("nan")


def _quantiles(boot: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2
    return float(np.nanquantile(boot, alpha)), float(np.nanquantile(boot, 1.0 - alpha))


def ratio_interval(items: pd.DataFrame, *, confidence: float = 0.95, n: int = 2000, seed: int = 0) -> Interval:
    """``sum(num) / sum(den)`` over ``items`` (columns ``num``, ``den``; items with ``den == 0`` are dropped) with a
    bootstrap interval over items, and over seeds too when the index has a ``seed`` level with several seeds."""
    items = items[items["den"] > 0]
    if items.empty:
        return Interval(NAN, NAN, NAN, confidence, 0)
    v = items[["num", "den"]].to_numpy(dtype=float)
    s, units, seeds = _resampled_sums(items.index, v, n, seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = s[:, 0] / s[:, 1]
    t = v.sum(axis=0)
    return Interval(float(t[0] / t[1]), *_quantiles(boot, confidence), confidence, units, seeds)


def paired_ratio_difference(a: pd.DataFrame, b: pd.DataFrame, *, confidence: float = 0.95, n: int = 2000,
                            seed: int = 0) -> Interval:
    """Metric of a minus metric of b over the items both have (joined on the index; items with a zero denominator
    on either side dropped), with a paired bootstrap interval: each resample draws the same items (and seeds, with a
    ``seed`` level) for both."""
    both = a[["num", "den"]].join(b[["num", "den"]], how="inner", lsuffix="_a", rsuffix="_b")
    both = both[(both["den_a"] > 0) & (both["den_b"] > 0)]
    if both.empty:
        return Interval(NAN, NAN, NAN, confidence, 0)
    v = both[["num_a", "den_a", "num_b", "den_b"]].to_numpy(dtype=float)
    s, units, seeds = _resampled_sums(both.index, v, n, seed)
    boot = s[:, 0] / s[:, 1] - s[:, 2] / s[:, 3]
    t = v.sum(axis=0)
    return Interval(float(t[0] / t[1] - t[2] / t[3]), *_quantiles(boot, confidence), confidence, units, seeds)


def _resampled_sums(index: pd.Index, v: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, int, int]:
    """Column sums of ``v`` [rows, k] over ``n`` bootstrap resamples -> ([n, k], items, seeds). Rows are items, or
    (seed, item) cells when ``index`` has a ``seed`` level with several values: then seeds and items are drawn
    independently and each cell counts (its seed's draws) x (its item's draws)."""
    rng = np.random.default_rng(seed)
    names = list(index.names)
    seed_codes = pd.factorize(index.get_level_values("seed"))[0] if "seed" in names else np.zeros(len(v), int)
    n_seeds = int(seed_codes.max()) + 1
    if n_seeds < 2:  # one run: the items are the resampled units (the same draws as ever for a given seed)
        idx = rng.integers(0, len(v), (n, len(v)))
        return v[idx].sum(axis=1), len(v), 1
    rest = [x for x in names if x != "seed"]
    item_codes = pd.MultiIndex.from_arrays([index.get_level_values(x) for x in rest]).factorize()[0] if rest else \
        np.zeros(len(v), int)
    n_items = int(item_codes.max()) + 1
    seed_w = rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=n)  # [n, S] draws per seed
    item_w = rng.multinomial(n_items, np.full(n_items, 1.0 / n_items), size=n)  # [n, I] draws per item
    sums = np.empty((n, v.shape[1]))
    for start in range(0, n, 256):  # [256, rows] weights at a time: bounded memory at Valley-sized evaluations
        w = seed_w[start:start + 256, seed_codes] * item_w[start:start + 256, item_codes]
        sums[start:start + 256] = w @ v
    return sums, n_items, n_seeds
