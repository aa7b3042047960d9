"""Text↔video retrieval metrics from a similarity matrix.

A caption has exactly one correct video; a video may have several correct captions, and video→text counts a hit
when any of them is ranked within k (the usual multi-caption protocol, e.g. MSR-VTT with 20 captions per video).
"""

from __future__ import annotations

import torch


def retrieval_metrics(sim: torch.Tensor, text_to_video: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """``sim`` [Nt, Nv] text x video scores; ``text_to_video`` [Nt] the correct video of each caption.

    Returns ``t2v_rk``, ``v2t_rk`` (fractions in [0, 1]) and ``t2v_median_rank`` / ``v2t_median_rank``
    (1 = best). Ties count against the query (the correct item ranks below equal scores)."""
    sim = sim.float()
    nt, nv = sim.shape
    if text_to_video.shape != (nt,):
        raise ValueError(f"text_to_video must have shape ({nt},), got {tuple(text_to_video.shape)}")
    correct = sim[torch.arange(nt), text_to_video]
    t2v_rank = (sim >= correct[:, None]).sum(1)  # 1-based rank of the correct video per caption

    positive = torch.zeros(nv, nt, dtype=torch.bool)
    positive[text_to_video, torch.arange(nt)] = True
    has_caption = positive.any(1)
    scores = sim.T  # [Nv, Nt]
    best_pos = scores.masked_fill(~positive, float("-inf")).amax(1)
    v2t_rank = ((scores >= best_pos[:, None]) & ~positive).sum(1) + 1  # negatives at or above the best positive
    v2t_rank = v2t_rank[has_caption]

    out: dict[str, float] = {}
    for k in ks:
        out[f"t2v_r{k}"] = (t2v_rank <= k).float().mean().item()
        out[f"v2t_r{k}"] = (v2t_rank <= k).float().mean().item()
    out["t2v_median_rank"] = t2v_rank.float().median().item()
    out["v2t_median_rank"] = v2t_rank.float().median().item()
    return out
