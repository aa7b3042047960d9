"""Comparison plots of an ablation: loss curves, metric bars, metrics over checkpoints, per-video score heatmaps.

Each function takes tidy DataFrames and writes one PNG. matplotlib's object API (``Figure``) is used, never pyplot,
so plotting keeps no global state and needs no display.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def loss_curves(history: pd.DataFrame, path: str | Path, *, smooth: int = 10) -> Path:
    """``history``: variant, key, step, value (e.g. train/loss, train/local_loss). One panel per key, one line
    per variant, with a centred moving average of ``smooth`` steps over the raw values (drawn faint)."""
    keys = sorted(history["key"].unique())
    fig = Figure(figsize=(4.2 * max(len(keys), 1), 3.2), layout="constrained")
    axes = fig.subplots(1, max(len(keys), 1), squeeze=False)[0]
    for ax, key in zip(axes, keys, strict=False):
        for i, (variant, g) in enumerate(history[history["key"] == key].groupby("variant", sort=True)):
            g = g.sort_values("step")
            colour = f"C{i % 10}"
            ax.plot(g["step"], g["value"], color=colour, alpha=0.25, linewidth=0.8)
            ax.plot(g["step"], g["value"].rolling(smooth, center=True, min_periods=1).mean(), color=colour, label=variant)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def metric_bars(table: pd.DataFrame, metrics: list[str], path: str | Path, *, label: str = "label") -> Path:
    """One panel per metric, one bar per row of ``table`` (named by its ``label`` column), coloured by variant as
    in the other plots (variants in sorted order)."""
    fig = Figure(figsize=(3.2 * len(metrics), 3.4), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    x = np.arange(len(table))
    order = {v: i for i, v in enumerate(sorted(table["variant"].unique()))}
    colours = [f"C{order[v] % 10}" for v in table["variant"]]
    for ax, metric in zip(axes, metrics, strict=True):
        values = table[metric].to_numpy(dtype=float)
        ax.bar(x, values, color=colours)
        for xi, v in zip(x, values, strict=True):
            ax.annotate(f"{v:.2f}", (xi, v), ha="center", va="bottom", fontsize=6)
        ax.set_xticks(x, table[label], rotation=60, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def metrics_by_checkpoint(table: pd.DataFrame, metrics: list[str], path: str | Path) -> Path:
    """One panel per metric: each variant's value at each evaluated step (references as dashed lines)."""
    fig = Figure(figsize=(3.6 * len(metrics), 3.2), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    trained = table[table["checkpoint"] != "reference"]
    refs = table[table["checkpoint"] == "reference"]
    for ax, metric in zip(axes, metrics, strict=True):
        for i, (variant, g) in enumerate(trained.groupby("variant", sort=True)):
            g = g.sort_values("step")
            ax.plot(g["step"], g[metric], marker="o", color=f"C{i % 10}", label=variant)
        for j, (_, r) in enumerate(refs.iterrows()):
            ax.axhline(r[metric], color="grey", linestyle=("--", ":", "-.")[j % 3], label=r["variant"])
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def score_heatmap(scores: pd.DataFrame, video_id: str, models: list[str], path: str | Path) -> Path:
    """The notes' caption-score table as a picture: the video's candidates (rows: ground truths first, then hard
    negatives, other videos' captions, unrelated) x ``models`` (columns, by their ``label``); cells are
    logit scale x cosine, and the best ground truth and best negative of each model are outlined."""
    from matplotlib.patches import Rectangle

    from hilight.eval.caption_scores import CATEGORIES

    s = scores[(scores["video_id"] == video_id) & (scores["kind"] == "candidate")]
    cands = s.drop_duplicates("text")[["text", "category"]]
    cands = cands.assign(order=cands["category"].map({c: i for i, c in enumerate(CATEGORIES)})).sort_values(
        "order", kind="stable")
    grid = s.pivot_table(index="text", columns="label", values="score", aggfunc="first").reindex(
        index=cands["text"], columns=models)
    values = grid.to_numpy(dtype=float)
    is_gt = (cands["category"] == "gt").to_numpy()
    fig = Figure(figsize=(5.5 + 0.9 * len(models), 1.2 + 0.28 * len(cands)), layout="constrained")
    ax = fig.subplots()
    lo, hi = np.nanmin(values, axis=0), np.nanmax(values, axis=0)
    colour = (values - lo) / np.where(hi > lo, hi - lo, 1.0)  # per model: logit scales differ between models
    ax.imshow(colour, cmap="viridis", aspect="auto", vmin=0, vmax=1)
    for (r, c), v in np.ndenumerate(values):
        if np.isfinite(v):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if colour[r, c] < 0.5 else "black")
    for c in range(values.shape[1]):  # outline each model's best ground truth (white) and best negative (red)
        for mask, colour in ((is_gt, "white"), (~is_gt, "red")):
            col = np.where(mask & np.isfinite(values[:, c]), values[:, c], -np.inf)
            if np.isfinite(col.max()):
                ax.add_patch(Rectangle((c - 0.5, int(col.argmax()) - 0.5), 1, 1, fill=False, edgecolor=colour, lw=1.5))
    tag = {"gt": "GT", "hard_negative": "HN", "other_video": "OV", "unrelated": "UN"}
    ax.set_yticks(range(len(cands)), [f"[{tag[c]}] {textwrap.shorten(t, 80)}" for t, c in
                                      zip(cands["text"], cands["category"], strict=True)], fontsize=6)
    ax.set_xticks(range(len(models)), models, rotation=30, ha="right", fontsize=7)
    ax.set_title(f"{video_id}: logit scale x cosine (colour scaled per model)", fontsize=9)
    return _save(fig, path)
