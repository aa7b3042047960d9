"""Caption-score metrics, the probe, suites, attention pictures and the selection rule, on hand-built inputs with
known answers."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from hilight.experiments.ablation import AblationConfig, SelectionRule, select_variant
from hilight.eval.attention import frame_attention, overlay, save_gif, save_grid
from hilight.eval.caption_scores import EvalDataError, build_suite, caption_metrics, per_video, probe_metrics


def _scores(rows):
    return pd.DataFrame(rows, columns=["video_id", "text", "category", "changed", "ref", "score"])


# two videos; v1: GT a (5) and b (2), its negative a' (3, from a, colour), other o (4), unrelated u (1)
#              v2: GT c (1), its negative c' (1, a tie, from c, pocket), unrelated u (0)
SCORES = _scores([
    ("v1", "a", "gt", "", "a", 5.0), ("v1", "b", "gt", "", "b", 2.0), ("v1", "a'", "hard_negative", "colour", "a", 3.0),
    ("v1", "o", "other_video", "", "", 4.0), ("v1", "u", "unrelated", "", "", 1.0),
    ("v2", "c", "gt", "", "c", 1.0), ("v2", "c'", "hard_negative", "pocket", "c", 1.0),
    ("v2", "u", "unrelated", "", "", 0.0),
])


def test_caption_metrics_known_answers():
    videos = per_video(SCORES).set_index("video_id")
    # v1: a beats all 3 negatives (rank 1); b is beaten by a', o (rank 3). v2: c ties c' -> the tie counts against it
    assert videos.loc["v1", "best_gt_rank"] == 1 and videos.loc["v1", "mean_gt_rank"] == 2.0
    assert videos.loc["v1", "margin"] == 1.0 and videos.loc["v1", "top1"]
    assert videos.loc["v2", "best_gt_rank"] == 2 and videos.loc["v2", "margin"] == 0.0 and not videos.loc["v2", "top1"]
    m = caption_metrics(SCORES)
    assert m["top1_accuracy"] == 0.5
    assert m["margin"] == 0.5
    assert m["gt_rank_mean"] == pytest.approx((1 + 3 + 2) / 3) and m["gt_rank_median"] == 2.0
    assert m["mrr"] == pytest.approx((1 + 0.5) / 2)
    assert m["score/gt"] == pytest.approx(8 / 3) and m["score/unrelated"] == 0.5 and m["score/other_video"] == 4.0
    assert m["hard_negative_accuracy"] == 0.5  # a > a' yes; c > c' no (tie)
    assert m["hard_negative_accuracy/colour"] == 1.0 and m["hard_negative_accuracy/pocket"] == 0.0


def test_collapsed_model_gets_no_credit():
    flat = SCORES.assign(score=1.0)
    m = caption_metrics(flat)
    assert m["top1_accuracy"] == 0.0 and m["hard_negative_accuracy"] == 0.0 and m["mrr"] < 0.5


def test_probe_short_true_must_win_strictly():
    probes = pd.DataFrame({"short_score": [3.0, 1.0, 2.0, 5.0], "long_score": [2.0, 1.0, 4.0, 4.9],
                           "changed": ["colour", "colour", "pocket", ""]})
    m = probe_metrics(probes)
    assert m["short_wins"] == 0.5 and m["pairs"] == 4.0
    assert m["gap"] == pytest.approx((1 + 0 - 2 + 0.1) / 4)
    assert m["short_wins/colour"] == 0.5 and m["short_wins/pocket"] == 0.0
    assert probe_metrics(probes.iloc[:0]) == {}


def _rows():
    return pd.DataFrame({
        "dataset": ["bil"] * 5, "video_id": ["bil/v1", "bil/v1", "bil/v2", "bil/v3", "bil/v3"],
        "video_file": ["f1", "f1", "f2", "f3", "f3"],
        "caption": ["The red ball is potted", "The cue ball stops", "The blue ball is potted",
                    "The cue ball stops", "A green ball rolls left slowly"],
    })


def test_build_suite_candidates(tmp_path):
    negs = tmp_path / "negatives.json"
    negs.write_text(json.dumps([
        {"video_id": "v1", "caption": "The red ball is potted", "negative": "The blue ball is potted", "changed": "colour"},
        {"video_id": "v1", "caption": "The red ball is potted", "negative": "The red ball is missed", "changed": "action"},
        {"video_id": "v3", "caption": "A green ball rolls left slowly", "negative": "A green ball rolls right slowly",
         "changed": "direction"},
        {"video_id": "v9", "caption": "x", "negative": "y", "changed": "colour"},  # a training video: ignored
    ]))
    suite = build_suite(_rows(), negatives={"bil": negs}, unrelated=["Cat on the table.", "The cue ball stops"],
                        other_videos=5, seed=0)
    assert suite.videos["video_id"].tolist() == ["bil/v1", "bil/v2", "bil/v3"]
    c = suite.candidates
    v1 = c[c["video_id"] == "bil/v1"]
    assert set(v1.loc[v1["category"] == "gt", "text"]) == {"The red ball is potted", "The cue ball stops"}
    assert v1.loc[v1["category"] == "hard_negative", "changed"].tolist() == ["colour", "action"]
    # other videos' captions never include the video's own captions (v3 shares "The cue ball stops" with v1)
    assert set(v1.loc[v1["category"] == "other_video", "text"]) == {"The blue ball is potted", "A green ball rolls left slowly"}
    # an "unrelated" text that is a true caption of the clip is not a negative of it
    assert v1.loc[v1["category"] == "unrelated", "text"].tolist() == ["Cat on the table."]
    assert c[c["video_id"] == "bil/v2"]["category"].value_counts()["unrelated"] == 2
    # no probe file: pairs derived from the negatives (the clip's shortest true caption vs longer negatives)
    assert suite.probes.to_dict("records") == [
        {"video_id": "bil/v1", "short": "The cue ball stops", "long": "The blue ball is potted", "changed": "colour"},
        {"video_id": "bil/v1", "short": "The cue ball stops", "long": "The red ball is missed", "changed": "action"},
        {"video_id": "bil/v3", "short": "The cue ball stops", "long": "A green ball rolls right slowly",
         "changed": "direction"},
    ]
    assert len(suite.texts()) == len(set(suite.texts()))


def test_build_suite_rejects_bad_eval_files(tmp_path):
    bad = tmp_path / "neg.jsonl"
    bad.write_text('{"video_id": "v1", "negative": "x"}\n')
    with pytest.raises(EvalDataError, match=r"lacks columns \['caption', 'changed'\]"):
        build_suite(_rows(), negatives={"bil": bad})
    wrong_ids = tmp_path / "neg.csv"
    pd.DataFrame({"video_id": ["zzz"], "caption": ["a"], "negative": ["b"], "changed": ["colour"]}).to_csv(wrong_ids)
    with pytest.raises(EvalDataError, match="names a held-out video of dataset 'bil'"):
        build_suite(_rows(), negatives={"bil": wrong_ids})
    empty = tmp_path / "probes.json"
    empty.write_text(json.dumps([{"video_id": "v1", "short": "", "long": "b"}]))
    with pytest.raises(EvalDataError, match="empty value"):
        build_suite(_rows(), probes={"bil": empty})
    with pytest.raises(EvalDataError, match="does not exist"):
        build_suite(_rows(), negatives={"bil": tmp_path / "nope.json"})


def test_frame_attention_picks_each_frames_patches():
    b, h, m, t, g = 2, 3, 4, 5, 3
    s = m + t * g * g
    att = torch.zeros(b, h, m, s)
    att[:, :, :, m + 2 * g * g + 4] = 1.0  # every query looks at frame 2's centre patch
    maps = frame_attention((torch.rand(b, h, m, s), att), num_frames=t, layer=-1)
    assert maps.shape == (b, t, g, g)
    assert maps[:, 2, 1, 1].eq(1).all() and maps.sum() == b
    cls = torch.zeros(b, h, m, s)
    cls[:, :, 0, m] = 1.0  # only CLS looks at frame 0's first patch
    assert frame_attention((cls,), num_frames=t, queries="cls")[:, 0, 0, 0].eq(1).all()
    assert frame_attention((cls,), num_frames=t, queries="all")[:, 0, 0, 0].eq(1 / m).all()
    with pytest.raises(ValueError, match="square patch grid"):
        frame_attention((torch.rand(1, 1, m, m + t * 6),), num_frames=t)


def test_overlay_gif_and_grid_have_the_right_frames(tmp_path):
    frames = np.stack([np.full((40, 48, 3), 40 * i, np.uint8) for i in range(5)])  # 5 distinct frames
    maps = np.zeros((5, 4, 4), np.float32)
    maps[3, 0, 0] = 1.0
    out = overlay(frames, maps, alpha=0.5)
    assert out.shape == frames.shape and out.dtype == np.uint8
    hot = overlay(np.zeros_like(frames), maps, alpha=0.5)
    assert not np.array_equal(hot[3, :5, :5], hot[0, :5, :5])  # the hot patch is coloured differently
    with Image.open(save_gif(out, tmp_path / "a.gif", fps=5)) as gif:
        assert gif.n_frames == 5 and gif.size == (48, 40) and gif.info["duration"] == 200
    # identical consecutive frames are merged by Pillow, keeping the total duration (same playback)
    with Image.open(save_gif(np.repeat(out[:1], 3, 0), tmp_path / "still.gif", fps=5)) as gif:
        assert gif.n_frames == 1 and gif.info["duration"] == 600
    with Image.open(save_grid([("frames", frames), ("model", out)], tmp_path / "grid.png")) as png:
        assert png.size[0] > png.size[1] > 0
    with pytest.raises(ValueError, match="frames"):
        overlay(frames, maps[:2])


def _table():
    rows = [("A", 100, 0.50, 1.0), ("A", 200, 0.75, 0.5), ("B", 100, 0.75, 0.9), ("B", 200, 0.60, 2.0),
            ("C", 100, 0.75, 0.9), ("orig", 0, 0.99, 9.0)]
    return pd.DataFrame([{"variant": v, "checkpoint": "reference" if v == "orig" else f"step-{s}", "step": s,
                          "path": f"/{v}/{s}", "m/acc": a, "m/margin": g} for v, s, a, g in rows])


def test_selection_rule_best_checkpoint_and_tie_breakers():
    rule = SelectionRule(metric="m/acc", tie_breakers=[{"metric": "m/margin"}])
    sel = select_variant(_table(), rule, ["A", "B", "C"])
    # A@200, B@100 and C@100 tie on acc 0.75; margin 0.9 vs 0.5 -> B and C tie again; B (listed first) wins
    # on the same step; the reference (0.99) is never selected
    assert [(r["variant"], r["step"]) for r in sel["ranking"]] == [("B", 100), ("C", 100), ("A", 200)]
    assert sel["winner"]["path"] == "/B/100" and sel["margin_over_runner_up"] == 0.0
    assert sel["references"][0]["variant"] == "orig"
    final = select_variant(_table(), SelectionRule(metric="m/acc", checkpoint="final", tie_breakers=[]), ["A", "B"])
    assert final["winner"]["variant"] == "A" and final["winner"]["step"] == 200
    lowest = select_variant(_table(), SelectionRule(metric="m/margin", mode="min", tie_breakers=[]), ["A", "B"])
    assert (lowest["winner"]["variant"], lowest["winner"]["step"]) == ("A", 200)
    with pytest.raises(ValueError, match=r"\['m/nope', 'caption/margin'\] are not in the comparison table; choose from \['m/acc'"):
        select_variant(_table(), SelectionRule(metric="m/nope"), ["A"])


def test_ablation_config_expands_and_validates_variants(tmp_path, caption_manifest):
    import yaml

    from tests.conftest import alignment_config

    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(alignment_config(caption_manifest, tmp_path / "out")))
    raw = {"base": str(base), "name": "abl", "output_dir": str(tmp_path / "abl"), "base_overrides": {"train": {"lr": 0.01}},
           "variants": [{"name": "BP", "overrides": {"loss": {"local": {"language_mask": False}}}},
                        {"name": "AE", "overrides": {"loss": {"local": {"placement": "after_embedding"}}}}]}
    configs = AblationConfig.model_validate(raw).variant_configs()
    assert configs["BP"].loss.local.language_mask is False and configs["AE"].loss.local.placement == "after_embedding"
    assert configs["AE"].train.lr == 0.01 and configs["AE"].train.max_steps == 6  # base kept, overrides applied
    assert configs["BP"].output_dir == f"{tmp_path / 'abl'}/BP" and configs["BP"].name == "abl-BP"
    bad = {**raw, "variants": [{"name": "X", "overrides": {"loss": {"local": {"placement": "everywhere"}}}}]}
    with pytest.raises(ValueError, match="variant 'X' is not a valid alignment config"):
        AblationConfig.model_validate(bad)
    with pytest.raises(ValueError, match="repeated"):
        AblationConfig.model_validate({**raw, "variants": [{"name": "A"}, {"name": "A"}]})


def test_a_variant_can_be_another_configs_training_run_verbatim(tmp_path, caption_manifest):
    """``config:``: the variant is exactly the alignment config the clipvip_alignment pipeline would run (same step
    parameters, so ZenML's cache can return that run); base_overrides do not apply, and with seeds it trains anew."""
    import yaml

    from hilight.config import load_config
    from hilight.train.alignment import AlignmentConfig
    from tests.conftest import alignment_config

    base, promoted = tmp_path / "base.yaml", tmp_path / "promoted.yaml"
    base.write_text(yaml.safe_dump(alignment_config(caption_manifest, tmp_path / "out")))
    promoted.write_text(yaml.safe_dump(alignment_config(caption_manifest, tmp_path / "table1k", keep_every=2)))
    raw = {"base": str(base), "name": "abl", "output_dir": str(tmp_path / "abl"), "base_overrides": {"train": {"val_every": 2}},
           "variants": [{"name": "BP", "config": str(promoted)},
                        {"name": "AE", "overrides": {"loss": {"local": {"placement": "after_embedding"}}}}]}
    config = AblationConfig.model_validate(raw)
    configs = config.variant_configs()
    assert configs["BP"] == load_config(promoted, AlignmentConfig)  # what `hilight run clipvip_alignment` would train
    assert configs["BP"].output_dir == str(tmp_path / "table1k") and configs["BP"].train.val_every == 3
    assert configs["AE"].train.val_every == 2
    seeded = config.variant_configs(seed=3)["BP"]
    assert seeded.train.seed == 3 and seeded.output_dir == f"{tmp_path / 'abl'}/BP/seed3" and seeded.train.val_every == 3
    both = {**raw, "variants": [{"name": "BP", "config": str(promoted), "overrides": {"train": {"lr": 1.0}}}]}
    with pytest.raises(ValueError, match="either config .* or overrides"):
        AblationConfig.model_validate(both)


def test_a_config_variant_must_differ_from_the_base_only_where_the_ablation_varies_something(tmp_path, caption_manifest):
    """Another learning rate, data or initial weights in the config variant than in the base would make it
    incomparable with the other variants: refused, naming the settings; a setting that some variant overrides (an axis
    of the ablation) or bookkeeping (validation and checkpoint schedule, where it writes) may differ."""
    import yaml

    from tests.conftest import alignment_config

    base, promoted = tmp_path / "base.yaml", tmp_path / "promoted.yaml"
    base.write_text(yaml.safe_dump(alignment_config(caption_manifest, tmp_path / "out")))
    promoted.write_text(yaml.safe_dump(alignment_config(caption_manifest, tmp_path / "table1k", keep_every=2)))
    ae = {"name": "AE", "overrides": {"loss": {"local": {"placement": "after_embedding"}}}}
    raw = {"base": str(base), "name": "abl", "base_overrides": {"train": {"lr": 0.01, "keep_last": 5}},
           "variants": [{"name": "BP", "config": str(promoted)}, ae]}
    with pytest.raises(ValueError, match=r"variant 'BP': .*promoted.yaml differs from the base .* in train.lr: 0.001 "
                                         r"there, 0.01 in the base\. No variant's overrides vary these") as err:
        AblationConfig.model_validate(raw)
    assert "keep_last" not in str(err.value)  # bookkeeping
    noop = {**raw, "variants": [*raw["variants"], {"name": "same", "overrides": {"train": {}}}]}
    with pytest.raises(ValueError, match=r"in train.lr: 0.001 there, 0.01 in the base"):
        AblationConfig.model_validate(noop)  # an empty override varies nothing, so it makes no axis of train
    other_data = {**raw, "base_overrides": {"data": {"train_datasets": ["other"]}}}
    with pytest.raises(ValueError, match=r'data.train_datasets: \["billiards"\] there, \["other"\] in the base'):
        AblationConfig.model_validate(other_data)
    # the same manifest written another way (a `..` detour) is the same setting, not an unfair difference
    detour = f"{caption_manifest}/../{caption_manifest.name}"
    respelled = {**raw, "base_overrides": {**raw["base_overrides"], "data": {"manifest_dir": detour}}}
    with pytest.raises(ValueError, match=r"in train.lr: 0.001 there, 0.01 in the base\. No") as err:
        AblationConfig.model_validate(respelled)
    assert "manifest_dir" not in str(err.value)
    # another seed is unfair for one training per variant, not when `seeds` retrains every variant at each seed
    other_seed = {**raw, "base_overrides": {"train": {"seed": 7}}}
    with pytest.raises(ValueError, match=r"in train.seed: 42 there, 7 in the base"):
        AblationConfig.model_validate(other_seed)
    assert AblationConfig.model_validate({**other_seed, "seeds": [0, 1]}).variant_configs(seed=1)["BP"].train.seed == 1
    # the learning rate is what this ablation varies: the config variant is the lr=1e-3 point of it
    lr_axis = {**raw, "variants": [{"name": "BP", "config": str(promoted)}, {"name": "fast", "overrides": {"train": {"lr": 0.1}}}]}
    assert AblationConfig.model_validate(lr_axis).variant_configs()["BP"].train.lr == 1e-3
