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
items would treat three runs of 200 clips as 600 clips and say nothing of the run-to-run spread (about half of
equally good pairs called different in simulation, ``benchmarks/seed_intervals.py``). So:

- seeds and items are resampled independently of each other and crossed, every cell weighted by (its seed's draws)
  x (its item's draws): Owen's two-factor ("pigeonhole") bootstrap for crossed random effects (Owen 2007, Ann.
  Appl. Stat.; the idea of resampling runs and tasks in Agarwal et al. 2021, "Deep RL at the edge of the
  statistical precipice");
- with few seeds that alone is still too narrow (a bootstrap of three runs cannot show their spread: the true mean
  lies outside the range of three draws a quarter of the time; 0.13-0.26 false calls at 2-3 seeds), so the interval
  is widened to cover also the Student-t interval of the per-seed values (S - 1 degrees of freedom), which is
  exact for normal run effects whatever S. The hull held false calls at or below the nominal rate at 2-10 seeds in
  simulation, at the price of power with few seeds: honest, since two or three runs say little about a fourth.

Hand-written because scipy.stats.bootstrap resamples one axis of independent observations, not two crossed
factors of ratio sums.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats


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
    return _interval(items.index, items[["num", "den"]].to_numpy(dtype=float), _ratio, confidence, n, seed)


def paired_ratio_difference(a: pd.DataFrame, b: pd.DataFrame, *, confidence: float = 0.95, n: int = 2000,
                            seed: int = 0, small_sample: bool = True) -> Interval:
    """Metric of a minus metric of b over the items both have (joined on the index; items with a zero denominator
    on either side dropped), with a paired bootstrap interval: each resample draws the same items (and seeds, with a
    ``seed`` level) for both. ``small_sample=False`` leaves out the Student-t widening over seeds (for comparison
    in ``benchmarks/seed_intervals.py`` only)."""
    both = a[["num", "den"]].add_suffix("_a").join(b[["num", "den"]].add_suffix("_b"), how="inner")
    both = both[(both["den_a"] > 0) & (both["den_b"] > 0)]
    if both.empty:
        return Interval(NAN, NAN, NAN, confidence, 0)
    v = both[["num_a", "den_a", "num_b", "den_b"]].to_numpy(dtype=float)
    return _interval(both.index, v, _difference, confidence, n, seed, small_sample)


def _ratio(sums: np.ndarray) -> np.ndarray:
    return sums[..., 0] / sums[..., 1]


def _difference(sums: np.ndarray) -> np.ndarray:
    return sums[..., 0] / sums[..., 1] - sums[..., 2] / sums[..., 3]


def _interval(index: pd.Index, v: np.ndarray, stat, confidence: float, n: int, seed: int,
              small_sample: bool = True) -> Interval:
    """``stat`` of the column sums of ``v`` [rows, k], with the bootstrap interval of the module docstring."""
    seed_codes, n_seeds, item_codes, n_items = _units(index, len(v))
    rng = np.random.default_rng(seed)
    if n_seeds < 2:  # one run: the items are the resampled units (the same draws as ever for a given seed)
        idx = rng.integers(0, len(v), (n, len(v)))
        sums = v[idx].sum(axis=1)
    else:
        seed_w = rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=n)  # [n, S] draws per seed
        item_w = rng.multinomial(n_items, np.full(n_items, 1.0 / n_items), size=n)  # [n, I] draws per item
        sums = np.empty((n, v.shape[1]))
        for start in range(0, n, 256):  # [256, rows] weights at a time: bounded memory at Valley-sized evaluations
            w = seed_w[start:start + 256, seed_codes] * item_w[start:start + 256, item_codes]
            sums[start:start + 256] = w @ v
    with np.errstate(invalid="ignore", divide="ignore"):  # a resample without a denominator: dropped (NaN)
        low, high = _quantiles(stat(sums), confidence)
    if n_seeds >= 2 and small_sample:
        per_seed = stat(np.stack([v[seed_codes == s].sum(axis=0) for s in range(n_seeds)]))
        half = stats.t.ppf(0.5 + confidence / 2, n_seeds - 1) * per_seed.std(ddof=1) / math.sqrt(n_seeds)
        low, high = min(low, per_seed.mean() - half), max(high, per_seed.mean() + half)
    return Interval(float(stat(v.sum(axis=0))), low, high, confidence, n_items, n_seeds)


def _units(index: pd.Index, rows: int) -> tuple[np.ndarray, int, np.ndarray, int]:
    """(seed code per row, seeds, item code per row, items): rows are items, or (seed, item) cells when ``index``
    has a ``seed`` level with several values (the item: the other levels, by position)."""
    if "seed" not in index.names:
        return np.zeros(rows, int), 1, np.arange(rows), rows
    labels = index.get_level_values("seed")
    if labels.isna().any():
        raise ValueError(f"{int(labels.isna().sum())} item(s) have no seed label; give every run's items its seed")
    seed_codes, uniques = pd.factorize(labels)
    if len(uniques) < 2:
        return np.zeros(rows, int), 1, np.arange(rows), rows
    rest = [i for i, name in enumerate(index.names) if name != "seed"]
    item_codes = (pd.MultiIndex.from_arrays([index.get_level_values(i) for i in rest]).factorize()[0] if rest
                  else np.zeros(rows, int))
    return seed_codes, len(uniques), item_codes, int(item_codes.max()) + 1
