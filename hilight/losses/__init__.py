"""Losses, one per module. Each is a small ``nn.Module`` that takes already projected features and returns a
dict of named ``*_loss`` terms; the training objective weights and sums them."""

from hilight.losses.anti_collapse import SimilarityPenalty
from hilight.losses.clip_global import ClipGlobalLoss
from hilight.losses.sparc_local import SparcLocalLoss

__all__ = ["ClipGlobalLoss", "SimilarityPenalty", "SparcLocalLoss"]
