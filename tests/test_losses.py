"""Losses: the top-k SPARC implementation against a plain dense formulation (loss and gradients), masking,
placements, group-aware CLIP loss, anti-collapse penalties — on random inputs with known answers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hilight.losses import ClipGlobalLoss, SimilarityPenalty, SparcLocalLoss
from hilight.losses.anti_collapse import mean_offdiag_sq_cosine
from hilight.losses.sparc_local import language_mask, parse_keep, placement_depths, sparc_weights


def dense_sparc_loss(v, t, mask, scale, k):
    """The plain formulation: per sample and per token, threshold the min-max similarities at the k-th largest
    value, L1-normalise, average the patches, and run two cross-entropies over the valid tokens in loops."""
    losses = []
    for b in range(v.shape[0]):
        s = t[b] @ v[b].T  # [L, P]
        s = (s - s.min(-1, keepdim=True).values) / (s.max(-1, keepdim=True).values - s.min(-1, keepdim=True).values + 1e-6)
        kth = s.sort(-1, descending=True).values[:, k - 1: k]
        w = torch.where(s >= kth, s, torch.zeros_like(s))
        w = w / w.sum(-1, keepdim=True)
        c = F.normalize(w @ v[b], dim=-1)
        tn = F.normalize(t[b], dim=-1)
        valid = mask[b].nonzero().flatten()
        logits = scale * c[valid] @ tn[valid].T
        target = torch.arange(len(valid))
        losses.append((F.cross_entropy(logits, target, reduction="sum") + F.cross_entropy(logits.T, target, reduction="sum")))
    return torch.stack(losses).sum() / (2 * mask.sum())


def _inputs(b=3, p=20, l=7, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(b, p, d, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(b, l, d, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(b, l, dtype=torch.bool)
    mask[0, 5:] = False
    mask[2, 3:] = False
    return v, t, mask


@pytest.mark.parametrize("k", [1, 5, 20])
def test_topk_matches_dense_formulation_in_loss_and_gradients(k):
    v, t, mask = _inputs()
    scale = torch.tensor(10.0, dtype=torch.float64)
    ours = SparcLocalLoss(k)(v, t, mask, scale)["local_loss"]
    gv, gt = torch.autograd.grad(ours, (v, t))
    ref = dense_sparc_loss(v, t, mask, scale, k)
    rv, rt = torch.autograd.grad(ref, (v, t))
    assert ours.dtype == torch.float32  # loss math runs in fp32
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gv, rv, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gt, rt, atol=1e-5, rtol=1e-4)


def test_weights_have_k_nonzeros_summing_to_one_and_ignore_patch_order():
    v, t, _ = _inputs(p=30)
    s = torch.bmm(t, v.transpose(1, 2)).float()
    w = sparc_weights(s, 6)
    assert torch.all((w > 0).sum(-1) == 6)
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))
    perm = torch.randperm(30)
    torch.testing.assert_close(sparc_weights(s[..., perm], 6), w[..., perm])


def test_padded_tokens_do_not_change_the_loss():
    v, t, mask = _inputs()
    loss = SparcLocalLoss(4)(v, t, mask, torch.tensor(5.0))["local_loss"]
    t2 = t.detach().clone()
    t2[0, 5:] = torch.randn(2, 8, dtype=torch.float64) * 100
    assert SparcLocalLoss(4)(v, t2, mask, torch.tensor(5.0))["local_loss"].item() == pytest.approx(loss.item(), rel=1e-6)


def test_chunked_batch_equals_full_batch():
    """The token-weighted mean decomposes exactly over batch chunks (weighted by their token counts)."""
    v, t, mask = _inputs(b=4)
    full = SparcLocalLoss(4)(v, t, mask, torch.tensor(5.0))["local_loss"]
    parts = [SparcLocalLoss(4)(v[i:i + 2], t[i:i + 2], mask[i:i + 2], torch.tensor(5.0))["local_loss"] * mask[i:i + 2].sum()
             for i in (0, 2)]
    assert (sum(parts) / mask.sum()).item() == pytest.approx(full.item(), rel=1e-6)


def test_fully_masked_rows_and_constant_similarities_stay_finite():
    v = torch.ones(2, 10, 4, requires_grad=True)  # every patch identical: max - min = 0
    t = torch.randn(2, 5, 4, requires_grad=True)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1, :2] = True
    loss = SparcLocalLoss(3)(v, t, mask, torch.tensor(100.0))["local_loss"]
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(v.grad).all() and torch.isfinite(t.grad).all()


def test_perfectly_grounded_tokens_have_low_loss():
    """Each token equals one distinct patch: grounding with k=1 recovers it, so the loss is ~0 at a high scale."""
    eye = torch.eye(6).unsqueeze(0)
    v = torch.cat([eye, torch.zeros(1, 4, 6)], dim=1)  # 10 patches, the first 6 one-hot
    loss = SparcLocalLoss(1)(v, eye.clone(), torch.ones(1, 6, dtype=torch.bool), torch.tensor(100.0))["local_loss"]
    assert loss.item() < 1e-3


def test_parse_keep_threshold_notation():
    assert parse_keep("2320/2356", 2356) == 36
    assert parse_keep("2332/2356", 2356) == 24
    assert parse_keep(36, 2356) == 36
    with pytest.raises(ValueError, match="written for 2356 patches but the model has 100"):
        parse_keep("2320/2356", 100)
    with pytest.raises(ValueError, match="outside"):
        parse_keep(0, 100)


def test_placements_and_layer_weights():
    assert placement_depths("before_projector", 12, 12) == [(12, 12, 1.0)]
    assert placement_depths("after_embedding", 12, 12) == [(0, 0, 1.0)]
    deep = placement_depths("all_hidden_states", 12, 12)
    assert len(deep) == 13 and deep[0][2] == pytest.approx(0.1) and deep[-1][2] == pytest.approx(1.0)
    assert deep[1][2] == pytest.approx(0.175)
    with pytest.raises(ValueError, match="unknown local-loss placement"):
        placement_depths("middle", 12, 12)


def test_language_mask_modes():
    eos = 1
    ids = torch.tensor([[0, 5, 6, eos, eos], [0, eos, eos, eos, eos]])
    att = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    assert language_mask(ids, att, eos, enabled=False).all()
    assert language_mask(ids, att, eos, exclude_special=False).tolist() == att.bool().tolist()
    m = language_mask(ids, att, eos)
    assert m.tolist() == [[False, True, True, False, False], [False, True, False, False, False]]  # empty caption keeps EOS


def test_global_loss_matches_clip_and_group_aware_drops_same_video_negatives():
    g = torch.Generator().manual_seed(0)
    v = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    t = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    logits = scale * v @ t.T
    target = torch.arange(4)
    expected = F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)
    assert ClipGlobalLoss()(v, t, scale)["global_loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert ClipGlobalLoss(reduction="mean")(v, t, scale)["global_loss"].item() == pytest.approx(expected.item() / 2, rel=1e-6)

    # pairs 0 and 1 are two captions of one video (the same video embedding twice)
    v2 = v.clone()
    v2[1] = v2[0]
    groups = torch.tensor([7, 7, 8, 9])
    plain = ClipGlobalLoss()(v2, t, scale)["global_loss"]
    aware = ClipGlobalLoss(group_aware=True)(v2, t, scale, groups)["global_loss"]
    lg = scale * v2 @ t.T
    lg[0, 1] = lg[1, 0] = -1e4
    manual = F.cross_entropy(lg, target) + F.cross_entropy(lg.T, target)
    assert aware.item() == pytest.approx(manual.item(), rel=1e-5)
    assert aware.item() < plain.item()
    # with all-distinct groups the two modes agree
    assert ClipGlobalLoss(group_aware=True)(v, t, scale, torch.arange(4))["global_loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_similarity_penalty_equals_explicit_pairs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]).bool()
    explicit = []
    for b in range(2):
        xn = F.normalize(x[b][mask[b]], dim=-1)
        c = (xn @ xn.T).pow(2)
        n = len(xn)
        explicit.append((c.sum() - c.diagonal().sum()) / (n * (n - 1)))
    assert mean_offdiag_sq_cosine(x, mask).item() == pytest.approx(torch.stack(explicit).mean().item(), rel=1e-5)
    same = torch.ones(1, 4, 3)  # collapsed: every pair has cosine 1
    out = SimilarityPenalty()(same, same, torch.ones(1, 4))
    assert out["patch_similarity_loss"].item() == pytest.approx(1.0) and out["token_similarity_loss"].item() == pytest.approx(1.0)
    assert math.isfinite(mean_offdiag_sq_cosine(x[:, :1]).item())
