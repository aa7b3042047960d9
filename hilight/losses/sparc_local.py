"""SPARC fine-grained ("local") loss with top-k patch sparsification (Bica et al., ICML 2024, Algorithm 1;
reference §2). Each text token is grounded in a weighted average of its sample's patches; the loss asks each
token to pick out its own grounded vector among the sample's other tokens, and vice versa.

Per sample b, with patch features v [P, D] and token features t [L, D]:

    s = t vᵀ  [L, P]  →  ŝ = min-max over P  →  keep the top k per token  →  w = ŝ_kept / Σ ŝ_kept
    c = w v  [L, D]   →  logits = τ · norm(c) norm(t)ᵀ  [L, L]  →  ½ (CE(logits) + CE(logitsᵀ)) over valid tokens

The notes write the sparsity as a threshold "N/P": 2320/2356 keeps k = 36 patches per token.

Memory: the largest tensors are [B, L, P] (18 MB at B=40, L=50, P=2356 in fp32). Weights are scattered into a
dense [B, L, P] matrix and contracted with ``bmm``; a [B, L, P, D] broadcast or a cross-sample [B, B, L, P]
similarity is never formed. All of it runs in fp32 with autocast off (max − min underflows in fp16).

Reduction: Σ(token loss · mask) / Σ mask over the whole batch (the pseudocode's token-weighted mean, which is
exactly decomposable over batch chunks), not the paper equation's per-sample 1/L_b average.

Data parallelism: the loss is per sample (each caption against its own video's patches), so no features are
gathered across ranks. Only the token count it divides by is global (one all-reduce of a scalar): each rank returns
world · (its tokens' summed loss) / (all ranks' tokens), whose DDP average is exactly the single-process loss over
the global batch even when ranks hold different numbers of valid tokens.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from hilight.losses.distributed import global_sum, world

Placement = Literal["after_embedding", "before_projector", "all_hidden_states"]
_MASKED = -1e4  # finite: -inf · 0 = NaN
_EPS = 1e-6


def parse_keep(keep: int | str, num_patches: int) -> int:
    """``36`` → 36; ``"2320/2356"`` (the notes' threshold notation: drop 2320 of 2356) → 36.

    The denominator must equal the model's patch count, so a threshold written for one shape is never silently
    applied to another."""
    if isinstance(keep, int) and not isinstance(keep, bool):
        k = keep
    else:
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(keep))
        if not match:
            raise ValueError(f"keep must be an int or 'N/P' (e.g. '2320/2356'), got {keep!r}")
        dropped, total = int(match[1]), int(match[2])
        if total != num_patches:
            raise ValueError(f"threshold {keep!r} is written for {total} patches but the model has {num_patches}; "
                             f"write it as 'N/{num_patches}' or give keep as an integer")
        k = total - dropped
    if not 1 <= k <= num_patches:
        raise ValueError(f"keep={keep!r} gives k={k}, outside 1..{num_patches} patches")
    return k


def placement_depths(placement: Placement, n_vision_layers: int, n_text_layers: int) -> list[tuple[int, int, float]]:
    """(vision hidden-state index, text hidden-state index, weight) per depth at which the loss is taken.

    Indices follow ``output_hidden_states``: 0 is the embedding output, i the output of layer i.
    ``all_hidden_states`` uses all n + 1 of them with weights rising linearly 0.1 → 1.0 (notes §2.1 scheme 4);
    the weights are not normalised, so the last layer counts fully as in the notes."""
    if placement == "after_embedding":
        return [(0, 0, 1.0)]
    if placement == "before_projector":
        return [(n_vision_layers, n_text_layers, 1.0)]
    if placement == "all_hidden_states":
        if n_vision_layers != n_text_layers:
            raise ValueError(f"all_hidden_states pairs layers one to one; the towers have {n_vision_layers} vision "
                             f"and {n_text_layers} text layers")
        weights = torch.linspace(0.1, 1.0, n_vision_layers + 1).tolist()
        return [(i, i, w) for i, w in enumerate(weights)]
    raise ValueError(f"unknown local-loss placement {placement!r}; "
                     "use after_embedding, before_projector or all_hidden_states")


def language_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, eos_token_id: int, *,
                  enabled: bool = True, exclude_special: bool = True) -> torch.Tensor:
    """[B, L] bool: the tokens the local loss grounds.

    ``enabled=False`` is the notes' "without language mask": every position, padding included, must align.
    Otherwise padding comes from ``attention_mask`` (CLIP pads with EOS, so ids cannot tell pads apart) and,
    with ``exclude_special``, the start token (it sees nothing under the causal mask) and the first EOS are
    dropped too; a caption left with no token keeps its EOS so that no row is empty."""
    if not enabled:
        return torch.ones_like(input_ids, dtype=torch.bool)
    mask = attention_mask.bool().clone()
    if exclude_special:
        eos_pos = (input_ids == eos_token_id).int().argmax(-1)
        rows = torch.arange(len(input_ids), device=input_ids.device)
        special = torch.zeros_like(mask)
        special[:, 0] = True
        special[rows, eos_pos] = True
        content = mask & ~special
        empty = ~content.any(1)
        content[rows[empty], eos_pos[empty]] = True
        mask = content
    return mask


def sparc_weights(similarity: torch.Tensor, k: int) -> torch.Tensor:
    """[B, L, P] raw similarities → [B, L, P] alignment weights with exactly k non-zeros per row summing to 1."""
    lo = similarity.amin(-1, keepdim=True)
    hi = similarity.amax(-1, keepdim=True)
    normed = (similarity - lo) / (hi - lo + _EPS)
    vals, idx = normed.topk(k, dim=-1)
    vals = vals / vals.sum(-1, keepdim=True).clamp_min(_EPS)
    return torch.zeros_like(normed).scatter(-1, idx, vals)


class SparcLocalLoss(nn.Module):
    def __init__(self, keep: int):
        super().__init__()
        self.keep = keep

    def forward(self, patch_feats: torch.Tensor, token_feats: torch.Tensor, mask: torch.Tensor,
                scale: torch.Tensor) -> dict[str, torch.Tensor]:
        """``patch_feats`` [B, P, D], ``token_feats`` [B, L, D] (same D), ``mask`` [B, L] bool, ``scale`` the
        inverse temperature. Returns ``{"local_loss": scalar}``."""
        with torch.autocast(patch_feats.device.type, enabled=False):
            v, t = patch_feats.float(), token_feats.float()
            k = min(self.keep, v.shape[1])
            weights = sparc_weights(torch.bmm(t, v.transpose(1, 2)), k)  # [B, L, P]
            grounded = F.normalize(torch.bmm(weights, v), dim=-1)  # [B, L, D]
            logits = scale.float() * torch.bmm(grounded, F.normalize(t, dim=-1).transpose(1, 2))  # [B, L, L]
            return {"local_loss": masked_token_ce(logits, mask)}


def masked_token_ce(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """½ (CE over rows + CE over columns) of per-sample [B, L, L] logits, target the diagonal, masked tokens
    removed as both candidates and queries; token-weighted mean over the batch."""
    mask = mask.bool()
    b, n, _ = logits.shape
    target = torch.arange(n, device=logits.device).expand(b, n)
    total = logits.new_zeros(())
    for lg in (logits, logits.transpose(1, 2)):
        lg = lg.masked_fill(~mask[:, None, :], _MASKED)
        ce = F.cross_entropy(lg.reshape(b * n, n), target.reshape(-1), reduction="none").view(b, n)
        total = total + torch.where(mask, ce, torch.zeros_like(ce)).sum()
    _, size = world()
    return size * total / (2 * global_sum(mask.sum()).clamp_min(1))
