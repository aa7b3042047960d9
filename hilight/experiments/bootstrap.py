"""Bootstrap intervals for the comparisons an experiment decides on (Efron & Tibshirani, percentile method).

Every metric the experiments compare is a ratio of sums over evaluation items: a fact accuracy pools checks
(sum of correct / sum of checks), a caption top-1 accuracy averages clips (sum of hits / number of clips). Each
item therefore contributes a numerator and a denominator (``num``, ``den``), and the metric over any resample of
items is ``sum(num) / sum(den)``. Resampling items, not answers or checks, keeps the items' internal correlation.

A paired interval resamples the same items for both models: the difference of two models scored on the same clips
is much tighter than two separate intervals suggest, which is what a promotion margin needs.
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
    items: int

    def as_dict(self) -> dict:
        return asdict(self)

    def overlaps(self, other: Interval) -> bool:
        return not (self.low > other.high or other.low > self.high)

    def text(self, digits: int = 3) -> str:
        if math.isnan(self.estimate):
            return "n/a"
        return (f"{self.estimate:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}] "
                f"({self.confidence:.0%}, n={self.items})")


NAN = float("nan")


def _quantiles(boot: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2
    return float(np.nanquantile(boot, alpha)), float(np.nanquantile(boot, 1.0 - alpha))


def ratio_interval(items: pd.DataFrame, *, confidence: float = 0.95, n: int = 2000, seed: int = 0) -> Interval:
    """``sum(num) / sum(den)`` over ``items`` (columns ``num``, ``den``; items with ``den == 0`` are dropped) with a
    bootstrap interval over items."""
    v = items.loc[items["den"] > 0, ["num", "den"]].to_numpy(dtype=float)
    if not len(v):
        return Interval(NAN, NAN, NAN, confidence, 0)
    idx = np.random.default_rng(seed).integers(0, len(v), (n, len(v)))
    s = v[idx].sum(axis=1)  # [n, 2]
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = s[:, 0] / s[:, 1]
    t = v.sum(axis=0)
    return Interval(float(t[0] / t[1]), *_quantiles(boot, confidence), confidence, len(v))


def paired_ratio_difference(a: pd.DataFrame, b: pd.DataFrame, *, confidence: float = 0.95, n: int = 2000,
                            seed: int = 0) -> Interval:
    """Metric of a minus metric of b over the items both have (joined on the index; items with a zero denominator
    on either side dropped), with a paired bootstrap interval: each resample draws the same items for both."""
    both = a[["num", "den"]].join(b[["num", "den"]], how="inner", lsuffix="_a", rsuffix="_b")
    both = both[(both["den_a"] > 0) & (both["den_b"] > 0)]
    if both.empty:
        return Interval(NAN, NAN, NAN, confidence, 0)
    v = both[["num_a", "den_a", "num_b", "den_b"]].to_numpy(dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(v), (n, len(v)))
    s = v[idx].sum(axis=1)  # [n, 4]
    boot = s[:, 0] / s[:, 1] - s[:, 2] / s[:, 3]
    t = v.sum(axis=0)
    return Interval(float(t[0] / t[1] - t[2] / t[3]), *_quantiles(boot, confidence), confidence, len(v))
