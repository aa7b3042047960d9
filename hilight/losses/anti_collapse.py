"""Anti-collapse penalties for the local loss (research notes §1.3).

The SPARC local loss contrasts tokens only within one sample, so a trivial optimum is every token and every patch
becoming the same vector. These penalties are the mean squared cosine similarity between distinct tokens
(``token_similarity_loss``) and between distinct patches (``patch_similarity_loss``) of each sample.

Computed exactly through the Gram identity  Σ_ij (x_i·x_j)² = ‖XᵀX‖²_F,  so the cost is [B, D, D], never the
[B, P, P] patch-patch matrix (222 M elements at B=40, P=2356).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mean_offdiag_sq_cosine(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [B, N, D], ``mask`` [B, N] (1 = counts). Mean over samples of the mean squared cosine similarity over
    ordered pairs i != j of valid rows; samples with fewer than two valid rows contribute 0."""
    x = F.normalize(x.float(), dim=-1)
    n = torch.full(x.shape[:1], x.shape[1], dtype=x.dtype, device=x.device)
    if mask is not None:
        mask = mask.to(x.dtype)
        x = x * mask[..., None]
        n = mask.sum(1)
    gram = torch.einsum("bnd,bne->bde", x, x)  # [B, D, D]
    total = gram.pow(2).sum((1, 2)) - n  # drop the diagonal: each valid row has x_i·x_i = 1
    pairs = n * (n - 1)
    per_sample = torch.where(pairs > 0, total / pairs.clamp_min(1), torch.zeros_like(total))
    return per_sample.mean()


class SimilarityPenalty(nn.Module):
    def forward(self, patch_feats: torch.Tensor, token_feats: torch.Tensor,
                language_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """``patch_feats`` [B, P, D], ``token_feats`` [B, L, D], ``language_mask`` [B, L]."""
        return {"token_similarity_loss": mean_offdiag_sq_cosine(token_feats, language_mask),
                "patch_similarity_loss": mean_offdiag_sq_cosine(patch_feats)}
