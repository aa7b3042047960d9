"""Intervals where the ablation chooses (issue 15, item 2): per-clip decomposition of the selection metrics, a
bootstrap interval per variant, "inconclusive" when the top two overlap, ``require_significance``, and the per-seed
aggregation. Synthetic score tables: no model, no pipeline."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from hilight.eval.caption_scores import caption_metrics, probe_metrics
from hilight.experiments.ablation import (
    AblationConfig,
    SelectionInconclusive,
    SelectionRule,
    check_significance,
    chosen_labels,
    clip_items,
    select_variant,
)


def scores_of(p_correct: float, n_videos: int, seed: int) -> pd.DataFrame:
    """A model's score table: per clip one ground truth, a colour and a pocket hard negative, an unrelated caption,
    and one probe pair; the ground truth beats its negatives with probability ``p_correct``."""
    rng = np.random.default_rng(seed)
    rows, probes = [], []
    for i in range(n_videos):
        v = f"billiards/v{i}"
        gt = f"caption {i}"
        rows.append({"video_id": v, "text": gt, "category": "gt", "changed": "", "ref": gt, "score": 1.0})
        for kind in ("colour", "pocket"):
            s = 0.5 if rng.random() < p_correct else 1.5
            rows.append({"video_id": v, "text": f"{kind} {i}", "category": "hard_negative", "changed": kind, "ref": gt,
                         "score": s})
        rows.append({"video_id": v, "text": "Cat on the table.", "category": "unrelated", "changed": "", "ref": "",
                     "score": rng.normal()})
        short = 1.0 if rng.random() < p_correct else 0.0
        probes += [{"video_id": v, "text": "short", "changed": "colour", "kind": "probe_short", "score": short, "pair": i},
                   {"video_id": v, "text": "long", "changed": "colour", "kind": "probe_long", "score": 0.5, "pair": i}]
    cands = pd.DataFrame(rows).assign(kind="candidate")
    return pd.concat([cands, pd.DataFrame(probes).assign(category="probe", ref="")], ignore_index=True)


def evaluated(models: dict[tuple[str, int | None], tuple[float, int]], n_videos: int = 60) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(table, scores) of models keyed (variant, seed) -> (p_correct, data seed), one checkpoint each (step 100)."""
    tables, all_scores = [], []
    for (variant, seed), (p, data_seed) in models.items():
        sc = scores_of(p, n_videos, data_seed)
        cands = sc[sc["kind"] == "candidate"]
        probes = sc[sc["kind"] == "probe_short"][["video_id", "score", "changed"]].rename(columns={"score": "short_score"})
        probes["long_score"] = 0.5
        m = {f"caption/{k}": v for k, v in caption_metrics(cands).items()}
        m.update({f"say_more/{k}": v for k, v in probe_metrics(probes).items()})
        tables.append({"variant": variant, "seed": seed, "checkpoint": "step-00000100", "step": 100, "path": "p", **m})
        all_scores.append(sc.assign(variant=variant, seed=seed, checkpoint="step-00000100", step=100))
    return pd.DataFrame(tables), pd.concat(all_scores, ignore_index=True)


@pytest.mark.parametrize("metric", ["caption/top1_accuracy", "caption/margin", "caption/mrr",
                                    "caption/hard_negative_accuracy", "caption/hard_negative_accuracy/colour",
                                    "caption/score/hard_negative", "say_more/short_wins", "say_more/short_wins/colour"])
def test_clip_items_add_up_to_the_reported_metric(metric):
    table, scores = evaluated({("A", None): (0.7, 0)})
    items = clip_items(scores, metric)
    assert len(items) == 60 and items["num"].sum() / items["den"].sum() == pytest.approx(table.at[0, metric])


def test_retrieval_metrics_have_no_per_clip_interval():
    _, scores = evaluated({("A", None): (0.7, 0)})
    assert clip_items(scores, "retrieval/t2v_r1") is None


def test_overlapping_intervals_are_inconclusive_and_can_be_refused():
    rule = SelectionRule(metric="caption/hard_negative_accuracy", tie_breakers=[])
    table, scores = evaluated({("A", None): (0.62, 0), ("B", None): (0.58, 1), ("C", None): (0.2, 2)})
    sel = select_variant(table, rule, ["A", "B", "C"], scores)
    top = [r["variant"] for r in sel["ranking"]]
    assert sorted(top[:2]) == ["A", "B"] and top[2] == "C"  # close in truth: either may lead on 60 clips
    a, b, c = (sel["intervals"][v] for v in "ABC")
    assert a["low"] < a["estimate"] < a["high"] and a["estimate"] == pytest.approx(table.at[0, rule.metric])
    assert sel["inconclusive"] is True and "overlap" in sel["significance"] and a["low"] <= b["high"]
    check_significance(sel, rule)  # not required: the ranking stands, the report says "inconclusive"
    strict = rule.model_copy(update={"require_significance": True})
    with pytest.raises(SelectionInconclusive, match=r"[AB] 0\.\d+ \[.*\] .* vs [AB] .* the intervals overlap"):
        check_significance(sel, strict)
    # a clear gap is significant, and require_significance lets it through
    sel = select_variant(table[table["variant"] != "B"], strict, ["A", "C"], scores)
    assert sel["inconclusive"] is False and c["high"] < a["low"]
    check_significance(sel, strict)


def test_seeds_average_rank_and_report_each_seeds_winner():
    rule = SelectionRule(metric="caption/top1_accuracy", tie_breakers=[])
    models = {("A", 0): (0.9, 0), ("A", 1): (0.5, 1), ("B", 0): (0.6, 2), ("B", 1): (0.7, 3)}
    table, scores = evaluated(models)
    sel = select_variant(table, rule, ["A", "B"], scores)
    by = table.groupby("variant")[rule.metric]
    a = sel["ranking"][[r["variant"] for r in sel["ranking"]].index("A")]
    assert a[rule.metric] == pytest.approx(by.mean()["A"]) and a[f"{rule.metric}/sd"] == pytest.approx(by.std()["A"])
    assert sel["winner"]["variant"] == by.mean().idxmax()
    assert [s["seed"] for s in a["seeds"]] == [0, 1] and a["step"] == 100
    per_seed = table.loc[table.groupby("seed")[rule.metric].idxmax()].set_index("seed")["variant"]
    assert sel["per_seed_winners"] == {str(k): v for k, v in per_seed.items()}
    # the interval resamples both seeds and the clips: its estimate is the mean over seeds (same clips per seed),
    # and A's two runs (0.9 and 0.5 on the same clips) widen it beyond what 60 clips alone would give
    iv = sel["intervals"]["A"]
    assert iv["estimate"] == pytest.approx(by.mean()["A"]) and (iv["items"], iv["seeds"]) == (60, 2)
    one_seed = select_variant(table[table["seed"] == 0], rule, ["A", "B"], scores)["intervals"]["A"]
    assert iv["high"] - iv["low"] > 1.5 * (one_seed["high"] - one_seed["low"])
    assert chosen_labels(sel)[:2] in (["A#s0@100", "A#s1@100"], ["B#s0@100", "B#s1@100"])


def test_seeds_expand_to_one_training_per_variant_and_seed(tmp_path, caption_manifest):
    import yaml

    from tests.conftest import alignment_config

    base = tmp_path / "alignment.yaml"
    base.write_text(yaml.safe_dump(alignment_config(caption_manifest, tmp_path / "unused")))
    cfg = AblationConfig.model_validate({"base": str(base), "output_dir": "out", "seeds": [0, 1],
                                         "variants": [{"name": "A"}, {"name": "B"}]})
    runs = cfg.training_runs()
    assert [(n, s) for n, s, _ in runs] == [("A", 0), ("B", 0), ("A", 1), ("B", 1)]
    assert [c.train.seed for _, _, c in runs] == [0, 0, 1, 1]
    assert runs[3][2].output_dir == "out/B/seed1" and runs[3][2].name == "ablation-B-seed1"
    with pytest.raises(ValueError, match="repeat"):
        AblationConfig.model_validate({"base": str(base), "seeds": [0, 0], "variants": [{"name": "A"}]})


def test_validation_checkpoints_are_chosen_by_the_training_run_not_by_the_reported_clips():
    # per variant three checkpoints; "best" takes the highest on the reported clips (and so reports the maximum of
    # three noisy values), "validation" the one its training run chose on its own validation set
    rows = [("A", 200, 0.70, False), ("A", 400, 0.60, True), ("A", 600, 0.65, False),
            ("B", 200, 0.62, True), ("B", 400, 0.66, False), ("B", 600, 0.64, False)]
    table = pd.DataFrame([{"variant": v, "seed": None, "checkpoint": f"step-{s:08d}", "step": s, "path": "p",
                           "is_best": b, "caption/top1_accuracy": x} for v, s, x, b in rows])
    best = select_variant(table, SelectionRule(tie_breakers=[]), ["A", "B"])
    assert (best["winner"]["variant"], best["winner"]["step"]) == ("A", 200)
    own = select_variant(table, SelectionRule(checkpoint="validation", tie_breakers=[]), ["A", "B"])
    assert [(r["variant"], r["step"], r["caption/top1_accuracy"]) for r in own["ranking"]] == [("B", 200, 0.62),
                                                                                              ("A", 400, 0.60)]
    with pytest.raises(ValueError, match=r"variant A: the checkpoint its training run chose .* \[200, 600\].*"
                                         r"eval.checkpoints"):
        select_variant(table[table["step"] != 400], SelectionRule(checkpoint="validation", tie_breakers=[]), ["A", "B"])
