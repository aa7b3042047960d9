"""CLIP's global contrastive loss over a batch of (video, caption) pairs, with an optional group-aware mode.

Standard mode is CLIP-ViP's ``NCELearnableTempLoss`` (``reduction="sum"``: CE(video→text) + CE(text→video)) or HF's
``clip_loss`` (``reduction="mean"``: their average).

Group-aware mode (research notes §1.4): billiards clips look alike and one video has several captions, each about a
different object. When two captions of the same video share a batch, plain CLIP pushes each caption away from its
own video's other copy. With ``groups`` (one video id per pair) those same-video entries are removed from each
row's softmax, so they are neither positives nor negatives.

Data parallelism (open_clip's ``ClipLoss(local_loss=True, gather_with_grad=True)``): every rank gathers all ranks'
embeddings and group ids and computes the loss of its *local rows* against *all columns* — its captions against
every video of the global batch and its videos against every caption. Each rank's mean over its rows, averaged
over ranks by DDP, is the single-process loss over the global batch, and because the gather passes gradients back
to the rank that owns each row, the averaged gradients equal the single-process ones too. Local rows rather than
the full [N, N] matrix on every rank: the same gradients for 1/world of the logits.

Hard negatives (NegCLIP, Yuksekgonul et al. 2023, "When and why vision-language models behave like bags-of-words"):
a contrastive model trained on captions that differ in many words at once can ignore a word, e.g. every colour,
and still match its batch. With ``negative_embeds`` (a caption of row i with one fact changed, ``negative_of[j] = i``)
row i's video→text softmax gets that wrong caption as one more column (several negatives of a row: one column
each), so the model is pushed to tell them apart. Negatives are per row (never another row's candidates, which may
be true of another video), so the DDP reasoning above is unchanged.

In that softmax a hard negative is one column among the batch's captions, and its gradient fades as soon as it
scores a little below the positive. ``hard_negative_loss`` is the pairwise term that keeps pushing: the two-way
cross-entropy of each negative against its own row's positive, ``softplus(s_neg - s_pos)`` at the same scale,
averaged over the negatives (CE-CLIP's cross-modal ranking term, Zhang et al. 2023, in its smooth form). With
``hard_negative_pairs=True`` it is returned beside ``global_loss``; the caller decides its weight
(``loss.hard_negative_weight``). Under DDP each rank divides its sum by the global count of negatives over the
world size, so the rank average is the mean over every negative however unevenly the ranks hold them.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from hilight.losses.distributed import gather_plain, gather_with_grad, global_sum, world

# a finite fill (not -inf): -inf logits multiplied by zero weights turn into NaN
_MASKED = -1e4


class ClipGlobalLoss(nn.Module):
    def __init__(self, *, group_aware: bool = False, reduction: Literal["sum", "mean"] = "sum",
                 hard_negative_pairs: bool = False):
        super().__init__()
        self.group_aware = group_aware
        self.reduction = reduction
        self.hard_negative_pairs = hard_negative_pairs

    def forward(self, video_embeds: torch.Tensor, text_embeds: torch.Tensor, scale: torch.Tensor,
                groups: torch.Tensor | None = None, negative_embeds: torch.Tensor | None = None,
                negative_of: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``video_embeds``/``text_embeds`` [B, P], L2-normalised, row i a matching pair; ``scale`` = exp(logit_scale);
        ``groups`` [B] video ids (needed for group-aware mode); ``negative_embeds`` [N, P] hard-negative captions,
        ``negative_of`` [N] their rows (any number per row). Under DDP, B is this rank's share of the batch and
        the negatives are every rank's rows."""
        if self.group_aware and groups is None:
            raise ValueError("group-aware CLIP loss needs `groups` (one video id per pair)")
        rank, size = world()
        v, t = video_embeds.float(), text_embeds.float()
        v_all, t_all = gather_with_grad(v), gather_with_grad(t)
        n = v.shape[0]
        target = torch.arange(n, device=v.device) + rank * n  # the positive's column among all ranks' rows
        v2t = scale.float() * v @ t_all.T  # [B, world·B] local videos x all captions
        t2v = scale.float() * t @ v_all.T  # [B, world·B] local captions x all videos
        if self.group_aware:
            g_all = gather_plain(groups)
            same = groups[:, None] == g_all[None, :]
            same[torch.arange(n, device=v.device), target] = False
            v2t, t2v = v2t.masked_fill(same, _MASKED), t2v.masked_fill(same, _MASKED)
        terms: dict[str, torch.Tensor] = {}
        # the pairwise term's sum; a zero in the graph (DDP needs one) while a rank holds no negatives
        pair_sum = v.sum() * 0.0 if self.hard_negative_pairs else None
        if negative_embeds is not None and len(negative_embeds):
            if negative_of is None or len(negative_of) != len(negative_embeds):
                raise ValueError(f"hard negatives need `negative_of`: one row index per negative "
                                 f"({len(negative_embeds)} negatives, "
                                 f"{'no' if negative_of is None else len(negative_of)} row indices)")
            if len(negative_of) and (int(negative_of.min()) < 0 or int(negative_of.max()) >= n):
                raise ValueError(f"`negative_of` holds row indices outside 0..{n - 1}: {negative_of.tolist()}")
            # column j of row i's extra block: its (j+1)-th negative; rows with fewer keep the masked fill
            order = torch.argsort(negative_of, stable=True)
            counts = torch.bincount(negative_of, minlength=n)
            slot = torch.empty_like(negative_of)
            slot[order] = torch.arange(len(order), device=order.device) - (counts.cumsum(0) - counts)[negative_of[order]]
            extra = torch.full((n, int(slot.max()) + 1), _MASKED, device=v.device, dtype=v2t.dtype)
            own = scale.float() * (v[negative_of] * negative_embeds.float()).sum(-1)
            extra = extra.index_put((negative_of, slot), own)
            if self.hard_negative_pairs:
                positive = v2t.gather(1, target[:, None]).squeeze(1)  # each row's own caption (never masked)
                pair_sum = F.softplus(own - positive[negative_of]).sum()
            v2t = torch.cat([v2t, extra], dim=1)
        if self.hard_negative_pairs and negative_embeds is not None:  # every rank joins the count, even with none
            total = global_sum(torch.tensor(float(len(negative_embeds)), device=v.device))
            terms["hard_negative_loss"] = pair_sum * size / total.clamp(min=1.0)
        loss = F.cross_entropy(v2t, target) + F.cross_entropy(t2v, target)
        terms["global_loss"] = loss if self.reduction == "sum" else loss / 2
        return terms
