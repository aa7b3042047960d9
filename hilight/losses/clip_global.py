"""CLIP's global contrastive loss over a batch of (video, caption) pairs, with an optional group-aware mode.

Standard mode is CLIP-ViP's ``NCELearnableTempLoss`` (``reduction="sum"``: CE(video→text) + CE(text→video)) or HF's
``clip_loss`` (``reduction="mean"``: their average).

Group-aware mode (research notes §1.4): billiards clips look alike and one video has several captions, each about a
different object. When two captions of the same video share a batch, plain CLIP pushes each caption away from its
own video's other copy. With ``groups`` (one video id per pair) those same-video entries are removed from each
row's softmax, so they are neither positives nor negatives.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

# a finite fill (not -inf): -inf logits multiplied by zero weights turn into NaN
_MASKED = -1e4


class ClipGlobalLoss(nn.Module):
    def __init__(self, *, group_aware: bool = False, reduction: Literal["sum", "mean"] = "sum"):
        super().__init__()
        self.group_aware = group_aware
        self.reduction = reduction

    def forward(self, video_embeds: torch.Tensor, text_embeds: torch.Tensor, scale: torch.Tensor,
                groups: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``video_embeds``/``text_embeds`` [B, P], L2-normalised, row i a matching pair; ``scale`` = exp(logit_scale);
        ``groups`` [B] video ids (needed for group-aware mode)."""
        logits = scale.float() * video_embeds.float() @ text_embeds.float().T  # [B, B] video x text
        if self.group_aware:
            if groups is None:
                raise ValueError("group-aware CLIP loss needs `groups` (one video id per pair)")
            same = groups[:, None] == groups[None, :]
            same.fill_diagonal_(False)
            logits = logits.masked_fill(same, _MASKED)
        target = torch.arange(logits.shape[0], device=logits.device)
        loss = F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)
        return {"global_loss": loss if self.reduction == "sum" else loss / 2}
