"""The demo's machine-readable summary (issue 15, item 5): the keys the issue lists, filled from the ablation's
selection and the selection decision, and the printed text rendered from the JSON alone."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from hilight.experiments.ablation import SelectionRule as AblationRule
from hilight.experiments.ablation import select_variant
from hilight.experiments.demo_summary import (ablation_summary, colour_fact_interval, render_demo_summary,
                                              selection_summary)
from hilight.experiments.selection import decide
from tests.test_ablation_intervals import evaluated
from tests.test_selection_gate import INCUMBENT, RULE, N, answers, model, table


def _summary() -> dict:
    abl_table, scores = evaluated({("BP_WithMask", None): (0.8, 0), ("AE_WithMask", None): (0.5, 1)})
    abl_table["label"] = abl_table["variant"] + "@100"
    ablation = select_variant(abl_table, AblationRule(metric="caption/hard_negative_accuracy", tie_breakers=[]),
                              ["BP_WithMask", "AE_WithMask"], scores)
    tables = {"champion-v1": model(0.5, 0.6, 0), "table1k": model(0.85, 0.6, 1), "original": model(0.4, 0.6, 2)}
    evidence = table(tables)
    evidence["billiards/fact/colour"] = evidence["billiards/fact_accuracy"]
    evidence["billiards/choice/colour"] = [0.4, 0.7, 0.3]
    evidence["billiards/wrong_video_choice/colour"] = [0.2, 0.25, 0.3]
    decision = decide(evidence, RULE, answers=tables, incumbent=INCUMBENT)
    decision["registry"] = {"champion": "3", "challenger": "2", "champion_uri": "models:/hilight-vlm@champion"}
    decision["changes"] = ["champion: version 1 -> 3"]
    stage1 = {c: {"lm_loss": 1.0, "lm_loss_initial": 2.0, "lm_loss_wrong_video": 1.5, "lm_loss_no_video": 1.8}
              for c in ("table1k", "original")}
    return {
        "seconds": 812.4, "path": "outputs/demo_summary.json",
        "timings": {"synthesis (billiards)": 52.4, "ablation": 579.2, "selection": 180.0},
        "data": {"run": "dv", "fingerprint": "abc", "counts": {"videos_accepted": 400}, "manifest": "m", "report": "r"},
        "alignment": {"billiards_t2v_r1": 0.12, "billiards_t2v_r1_random": 0.01, "models": "x",
                      "runs": {"billiards alignment": {"run": "a", "t2v_r1": 0.12, "random_t2v_r1": 0.01,
                                                       "t2v_median_rank": 4, "random_t2v_median_rank": 40}}},
        "ablation": ablation_summary("abl", abl_table, ablation, "outputs/ablation/report", scores),
        "llm": {"run": "llm", "lm_loss": 1.2, "lm_loss_untrained": 6.0, "model": "outputs/llm_pretrain/model"},
        "selection": selection_summary("sel", decision, evidence, stage1, "outputs/selection", answers=tables),
        "mlflow": {"store": "sqlite:///x", "ui": "hilight ui"}, "ask": "hilight ask v.mp4 \"What's happened?\"",
    }


def test_summary_has_the_issues_keys_and_values():
    s = json.loads(json.dumps(_summary()))  # JSON-able as written
    assert {"billiards_t2v_r1", "billiards_t2v_r1_random"} <= set(s["alignment"])
    ab = s["ablation"]
    assert ab["selected"] == "BP_WithMask" and ab["inconclusive"] is False
    assert 0.6 < ab["colour_hard_negative_accuracy"] < 1.0 and ab["interval"]["low"] < ab["value"] < ab["interval"]["high"]
    # the colour hard negatives' interval: over the winner's clips, around the value the table reports
    civ = ab["colour_hard_negative_interval"]
    assert civ["estimate"] == pytest.approx(ab["colour_hard_negative_accuracy"]) and civ["items"] == 60
    assert civ["low"] < civ["estimate"] < civ["high"] and civ["confidence"] == 0.95
    sel = s["selection"]
    assert {"champion", "incumbent", "primary_metric", "margin", "ci_low", "ci_high", "colour_fact_accuracy"} <= set(sel)
    assert sel["champion"] == "table1k" and sel["incumbent"]["label"] == "champion-v1" and sel["status"] == "promoted"
    assert sel["ci_low"] > 0 and sel["margin_of"] == "table1k - champion-v1"
    assert set(sel["colour_fact_accuracy"]) == {"champion-v1", "table1k", "original"}
    # each model's colour facts with an interval over its answers, around the value the evidence table holds
    for name, iv in sel["colour_fact_interval"].items():
        assert iv["estimate"] == pytest.approx(sel["colour_fact_accuracy"][name]) and iv["items"] == 200
        assert iv["low"] < iv["estimate"] < iv["high"] and iv["high"] - iv["low"] < 0.2
    assert sel["colour_fact_interval"]["table1k"]["low"] > sel["colour_fact_interval"]["original"]["high"]
    assert sel["colour_choice_accuracy"] == {"champion-v1": 0.4, "table1k": 0.7, "original": 0.3}
    assert sel["metrics"]["table1k"]["billiards/choice/colour"] == 0.7
    assert sel["colour_choice_wrong_video"]["table1k"] == 0.25  # the control: what table1k's video reading adds
    assert s["seconds"] == pytest.approx(812.4)


def test_colour_fact_interval_resamples_clips_not_answers():
    rng = np.random.default_rng(3)
    one = answers(rng.random(N) < 0.5, rng.random(N) < 0.5)
    two = pd.concat([one, one.assign(kind="describe")])  # each clip answered twice, alike: no new evidence
    rule = {"confidence": 0.95, "bootstrap_samples": 2000}
    a, b = colour_fact_interval(one, rule), colour_fact_interval(two, rule)
    assert a["items"] == b["items"] == N and b["estimate"] == pytest.approx(a["estimate"])
    assert b["high"] - b["low"] == pytest.approx(a["high"] - a["low"], abs=0.01)  # per answer it would be ~1/sqrt(2)
    seeded = pd.concat([one.assign(seed=0), one.assign(seed=1)])  # the same clips at two training seeds
    crossed = colour_fact_interval(seeded, rule)
    assert (crossed["items"], crossed["seeds"]) == (N, 2) and crossed["estimate"] == pytest.approx(a["estimate"])


def test_printed_summary_is_rendered_from_the_json():
    summary = json.loads(json.dumps(_summary()))
    text = render_demo_summary(summary)
    assert "selected variant      BP_WithMask at step-00000100: caption/hard_negative_accuracy" in text
    assert "significant (the top two intervals are apart)" in text
    civ = summary["ablation"]["colour_hard_negative_interval"]
    assert (f"colour hard-negative accuracy {summary['ablation']['colour_hard_negative_accuracy']:.3f} "
            f"[{civ['low']:.3f}, {civ['high']:.3f}] over 60 clips (chance 0.5)") in text
    line = next(x for x in text.splitlines() if x.startswith("colour facts "))
    for name, iv in summary["selection"]["colour_fact_interval"].items():
        assert f"{name} {iv['estimate']:.3f} [{iv['low']:.3f}, {iv['high']:.3f}]" in line
    assert "decision              promoted: table1k beats the champion (champion-v1)" in text
    assert "margin over the incumbent champion-v1: table1k - champion-v1 on billiards/fact_accuracy +0." in text
    assert "champion              models:/hilight-vlm@champion = version 3 (table1k); challenger = version 2" in text
    assert "time                  synthesis (billiards) 52 s, ablation 579 s, selection 180 s\n" in text
    assert text.rstrip().endswith("(812 s)")
    del summary["timings"]  # a summary written before the per-part times still renders
    assert "time    " not in render_demo_summary(summary)
