"""NegCLIP-style hard negatives in stage-0 training: the loss term, the batches, the job and its bad inputs."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from hilight.data.captions import CaptionVideoDataset, attach_hard_negatives
from hilight.losses import ClipGlobalLoss
from tests.conftest import alignment_config


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_hard_negative_is_one_more_column_of_its_own_rows_video_to_text_softmax():
    v, t, neg = _unit(4, 8), _unit(4, 8, seed=1), _unit(2, 8, seed=2)
    scale = torch.tensor(10.0)
    negative_of = torch.tensor([2, 0])
    got = ClipGlobalLoss()(v, t, scale, negative_embeds=neg, negative_of=negative_of)["global_loss"]

    # by hand: rows 0 and 2 get their negative as a fifth logit; rows 1 and 3 are plain CLIP rows
    logits = scale * v @ t.T
    v2t = 0.0
    for i in range(4):
        row = logits[i]
        if i in negative_of.tolist():
            row = torch.cat([row, (scale * v[i] @ neg[negative_of.tolist().index(i)])[None]])
        v2t = v2t + F.cross_entropy(row[None], torch.tensor([i]))
    want = v2t / 4 + F.cross_entropy(logits.T, torch.arange(4))
    torch.testing.assert_close(got, want)

    plain = ClipGlobalLoss()(v, t, scale)["global_loss"]
    assert got > plain  # an extra wrong candidate can only add to the loss
    # a negative identical to its caption leaves that row a coin toss between the two: log 2 for that row (of 4)
    # where every other term is ~0
    sharp = ClipGlobalLoss()(torch.eye(4, 8), torch.eye(4, 8), torch.tensor(100.0),
                             negative_embeds=torch.eye(4, 8)[:1], negative_of=torch.tensor([0]))["global_loss"]
    assert sharp.item() == pytest.approx(torch.log(torch.tensor(2.0)).item() / 4, abs=1e-3)


def test_hard_negative_gradient_pushes_the_video_away_from_the_wrong_caption():
    v = _unit(3, 8).requires_grad_()
    t, neg = _unit(3, 8, seed=1), _unit(1, 8, seed=2)
    loss = ClipGlobalLoss()(v, t, torch.tensor(10.0), negative_embeds=neg, negative_of=torch.tensor([1]))["global_loss"]
    loss.backward()
    v2 = v.detach().clone().requires_grad_()
    ClipGlobalLoss()(v2, t, torch.tensor(10.0))["global_loss"].backward()
    # what the negative adds to a gradient-descent step moves row 1's video away from it; rows 0 and 2 do not see it
    assert (-(v.grad[1] - v2.grad[1]) @ neg[0]).item() < 0
    torch.testing.assert_close(v.grad[[0, 2]], v2.grad[[0, 2]])


def test_pairwise_hard_negative_term_is_each_negatives_two_way_loss_against_its_own_caption():
    v, t, neg = _unit(4, 8), _unit(4, 8, seed=1), _unit(3, 8, seed=2)
    scale, negative_of = torch.tensor(10.0), torch.tensor([2, 0, 2])
    terms = ClipGlobalLoss(group_aware=True, hard_negative_pairs=True)(v, t, scale, torch.tensor([0, 0, 1, 2]),
                                                                       negative_embeds=neg, negative_of=negative_of)
    # by hand: -log of the caption's share of {caption, negative}, averaged over the three negatives
    want = torch.stack([-F.log_softmax(torch.stack([scale * v[i] @ t[i], scale * v[i] @ neg[j]]), 0)[0]
                        for j, i in enumerate(negative_of.tolist())]).mean()
    torch.testing.assert_close(terms["hard_negative_loss"], want)
    assert "hard_negative_loss" not in ClipGlobalLoss()(v, t, scale, negative_embeds=neg, negative_of=negative_of)
    # a negative equal to its caption is a coin toss: log 2, whatever the batch around it
    tie = ClipGlobalLoss(hard_negative_pairs=True)(torch.eye(4, 8), torch.eye(4, 8), torch.tensor(100.0),
                           negative_embeds=torch.eye(4, 8)[1:2], negative_of=torch.tensor([1]))
    assert tie["hard_negative_loss"].item() == pytest.approx(torch.log(torch.tensor(2.0)).item())


def test_pairwise_term_pushes_a_negative_as_hard_however_crowded_the_batch():
    # billiards captions share templates, so a batch's other captions score close to a video's own and take most of
    # its softmax: the negative's column gets a small share of the push. The pairwise term's push does not depend
    # on the rest of the batch.
    t0, neg_dir = torch.eye(8)[0], torch.eye(8)[5]
    v = F.normalize(t0 + 0.3 * neg_dir, dim=0)[None].repeat(4, 1)
    negative = F.normalize(t0 + 0.6 * neg_dir, dim=0)

    def pushes(others_near: bool):
        t = torch.eye(4, 8)
        if others_near:  # the other rows' captions nearly the video's own
            t[1:] = F.normalize(t0 + 0.2 * torch.eye(8)[1:4] + 0.25 * neg_dir, dim=-1)
        neg = negative[None].clone().requires_grad_()
        terms = ClipGlobalLoss(hard_negative_pairs=True)(v, t, torch.tensor(20.0), negative_embeds=neg,
                                                         negative_of=torch.tensor([0]))
        (soft,) = torch.autograd.grad(terms["global_loss"], neg, retain_graph=True)
        (pair,) = torch.autograd.grad(terms["hard_negative_loss"], neg)
        return soft.norm().item(), pair.norm().item()

    soft_far, pair_far = pushes(False)
    soft_near, pair_near = pushes(True)
    # alone with its caption, the column pushes as hard (per row: the global loss is a mean over its 4 rows)
    assert 4 * soft_far == pytest.approx(pair_far, rel=0.1)
    assert soft_near < 0.4 * soft_far  # in a crowded batch the column's push shrinks
    assert pair_near == pytest.approx(pair_far)  # the pairwise push does not
    # and the pairwise push is sigmoid(s_neg - s_pos) x scale x |v|: the two-way softmax's share of the negative
    s_pos, s_neg = 20 * v[0] @ t0, 20 * v[0] @ negative
    assert pair_far == pytest.approx((torch.sigmoid(s_neg - s_pos) * 20).item(), rel=1e-4)


def test_hard_negative_weight_adds_the_term_and_needs_a_negatives_file(caption_manifest, tmp_path, billiards_dir):
    from hilight.models.clipvip import build_clipvip, load_preset
    from hilight.train.alignment import AlignmentConfig, AlignmentObjective, LossSpec
    from tests.ddp_recipe import fixed_batch, rank_rows

    model = build_clipvip(load_preset("tiny"), seed=0)
    batch = rank_rows(fixed_batch(), 0, 8)
    spec = {"group_aware": True, "local": {"keep": 12}}  # the local loss too: the term is added beside it
    plain = AlignmentObjective(LossSpec.model_validate(spec), model.config)(model, batch)
    weighted_spec = LossSpec.model_validate({**spec, "hard_negative_weight": 0.5})
    weighted = AlignmentObjective(weighted_spec, model.config)(model, batch)
    assert "hard_negative_loss" not in plain
    torch.testing.assert_close(weighted["global_loss"], plain["global_loss"])
    torch.testing.assert_close(weighted["loss"], plain["loss"] + 0.5 * weighted["hard_negative_loss"])
    assert weighted["hard_negative_loss"] > 0

    raw = alignment_config(caption_manifest, tmp_path / "out", max_steps=2, val_every=2)
    raw["loss"] = {**raw.get("loss", {}), "hard_negative_weight": 0.5}
    with pytest.raises(ValueError, match=r"hard_negative_weight is 0.5 but data.hard_negatives is empty"):
        AlignmentConfig.model_validate(raw)
    raw["data"]["hard_negatives"] = {"billiards": str(billiards_dir / "negatives.json")}
    assert AlignmentConfig.model_validate(raw).loss.hard_negative_weight == 0.5


def test_several_negatives_of_a_row_are_each_one_more_column_of_its_softmax():
    v, t, neg = _unit(3, 8), _unit(3, 8, seed=1), _unit(4, 8, seed=2)
    scale = torch.tensor(10.0)
    negative_of = torch.tensor([2, 0, 2, 2])  # row 2 has three negatives, not adjacent; row 1 none
    got = ClipGlobalLoss()(v, t, scale, negative_embeds=neg, negative_of=negative_of)["global_loss"]

    logits = scale * v @ t.T
    v2t = 0.0
    for i in range(3):
        own = [scale * v[i] @ neg[j] for j in range(4) if negative_of[j] == i]
        row = torch.cat([logits[i], torch.stack(own)]) if own else logits[i]
        v2t = v2t + F.cross_entropy(row[None], torch.tensor([i]))
    torch.testing.assert_close(got, v2t / 3 + F.cross_entropy(logits.T, torch.arange(3)))
    # one negative per row is the same loss whichever way it is passed
    one = ClipGlobalLoss()(v, t, scale, negative_embeds=neg[:2], negative_of=negative_of[:2])["global_loss"]
    assert got > one


def test_bad_negative_rows_are_refused():
    v, t = _unit(2, 4), _unit(2, 4, seed=1)
    with pytest.raises(ValueError, match=r"negative_of.*2 negatives, 1 row indices"):
        ClipGlobalLoss()(v, t, torch.tensor(1.0), negative_embeds=_unit(2, 4), negative_of=torch.tensor([0]))
    with pytest.raises(ValueError, match=r"outside 0\.\.1: \[0, 2\]"):
        ClipGlobalLoss()(v, t, torch.tensor(1.0), negative_embeds=_unit(2, 4), negative_of=torch.tensor([0, 2]))


class _Tok:
    """Whitespace tokenizer with the call signature the dataset uses."""

    def __call__(self, texts, **kw):
        ids = [[hash(w) % 97 + 2 for w in s.split()][:6] for s in texts]
        pad = [x + [1] * (6 - len(x)) for x in ids]
        return {"input_ids": torch.tensor(pad), "attention_mask": torch.tensor([[1] * len(x) + [0] * (6 - len(x))
                                                                                  for x in ids])}


def test_batches_carry_each_captions_negative_after_the_captions(tmp_path):
    rows = pd.DataFrame({"dataset": ["b"] * 3, "video_id": ["b/v1", "b/v1", "b/v2"],
                         "video_file": ["v1.mp4", "v1.mp4", "v2.mp4"],
                         "caption": ["red ball in", "white stops", "blue ball in"]})
    records = pd.DataFrame({"dataset": ["b", "b", "b", "x"], "video_id": ["v1", "v1", "v2", "v1"],
                            "caption": ["red ball in", "red ball in", "blue ball in", "red ball in"],
                            "negative": ["pink ball in", "red ball out", "yellow ball in", "other dataset"]})
    rows = attach_hard_negatives(rows, records)
    assert rows["negatives"].tolist() == [("pink ball in", "red ball out"), (), ("yellow ball in",)]

    ds = CaptionVideoDataset(rows, _Tok(), num_frames=2, image_size=8, max_length=6)
    ds._cache = {0: torch.zeros(2, 3, 8, 8), 1: torch.ones(2, 3, 8, 8)}  # no decoding in this test
    assert [ds[i][2] for i in range(3)] == [("pink ball in",), (), ("yellow ball in",)]
    ds.epoch = 1  # the next epoch cycles to the caption's next negative
    assert ds[0][2] == ("red ball out",)
    batch = ds.collate([ds[i] for i in range(3)])
    assert batch["input_ids"].shape[0] == 5 and batch["groups"].tolist() == [0, 0, 1]
    assert batch["negative_of"].tolist() == [0, 2]
    assert batch["video_index"].tolist() == [0, 0, 1, 0, 1]  # each negative is scored against its row's video
    tok = _Tok()(["red ball out", "yellow ball in"])["input_ids"]
    assert torch.equal(batch["input_ids"][3:], tok)

    # two per caption: every negative of the first caption in one batch, in turn by epoch; a caption with one
    # keeps showing it
    ds.negatives_per_caption = 2
    ds.epoch = 0
    assert [ds[i][2] for i in range(3)] == [("pink ball in", "red ball out"), (), ("yellow ball in",)]
    batch = ds.collate([ds[i] for i in range(3)])
    assert batch["negative_of"].tolist() == [0, 0, 2]
    assert batch["video_index"].tolist() == [0, 0, 1, 0, 0, 1]
    assert torch.equal(batch["input_ids"][3:], _Tok()(["pink ball in", "red ball out", "yellow ball in"])["input_ids"])


def test_alignment_job_with_hard_negatives_trains_and_rejects_a_bad_file(tmp_path, caption_manifest, billiards_dir):
    from hilight.data.eval_files import EvalFileRejected
    from hilight.train.alignment import AlignmentConfig, run_alignment

    raw = alignment_config(caption_manifest, tmp_path / "out", max_steps=2, val_every=2)
    raw["data"]["hard_negatives"] = {"billiards": str(billiards_dir / "negatives.json")}
    result = run_alignment(AlignmentConfig.model_validate(raw))
    assert result.fit.skipped_steps == 0 and result.fit.step == 2
    plain = run_alignment(AlignmentConfig.model_validate(alignment_config(caption_manifest, tmp_path / "out",
                                                                          max_steps=2, val_every=2)))
    assert plain.run_dir != result.run_dir  # the negatives are part of the run key

    # a file whose records lack the negative text: refused through the hard_negatives contract, naming the file
    bad = tmp_path / "negatives.json"
    records = json.loads((billiards_dir / "negatives.json").read_text())
    bad.write_text(json.dumps([{k: v for k, v in r.items() if k != "negative"} for r in records]))
    raw["data"]["hard_negatives"] = {"billiards": str(bad)}
    with pytest.raises(EvalFileRejected, match=f"negatives file {bad}"):
        run_alignment(AlignmentConfig.model_validate(raw))
    # negatives of a dataset that is not trained on
    raw["data"]["hard_negatives"] = {"general": str(billiards_dir / "negatives.json")}
    with pytest.raises(ValueError, match=r"names datasets \['general'\] that have no training captions"):
        run_alignment(AlignmentConfig.model_validate(raw))
    # the source file is untouched by validation
    assert json.loads((billiards_dir / "negatives.json").read_text()) == records
