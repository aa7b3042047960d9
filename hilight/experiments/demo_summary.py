"""The demo's machine-readable summary (``outputs/demo_summary.json``) and the text ``hilight demo`` prints from it.

``hilight demo`` gathers the numbers of its runs into one JSON-able dict (``ablation_summary`` and
``selection_summary`` build those two parts): at least ``alignment``
(billiards held-out text→video R@1 and its random-init baseline), ``ablation`` (the selected variant, its colour
hard-negative accuracy, whether the choice is inconclusive), ``selection`` (champion, incumbent, primary metric, the
margin behind the decision with its interval, each candidate's colour fact accuracy in generated answers, with a
bootstrap interval over clips when the per-answer tables are given, and as a multiple choice, with the video and
with another clip's video), ``seconds`` and ``timings`` (seconds per part).
``render_demo_summary`` turns that dict, and nothing else, into the printed summary, so the two never disagree.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from hilight.experiments.ablation import chosen_labels, winner_interval
from hilight.experiments.bootstrap import ratio_interval
from hilight.experiments.selection import per_item

ABLATION_COLUMNS = ["caption/top1_accuracy", "caption/hard_negative_accuracy", "caption/hard_negative_accuracy/colour",
                    "say_more/short_wins", "retrieval/t2v_r1"]
COLOUR_FACT = "billiards/fact/colour"
SELECTION_COLUMNS = ["billiards/fact_accuracy", "billiards/fact/colour", "billiards/fact/action", "billiards/fact/pocket",
                     "billiards/choice_accuracy", "billiards/choice/colour", "billiards/choice/pocket",
                     "billiards/choice_chance", "billiards/wrong_video_choice/colour", "billiards/describe/rougeL", "billiards/describe/clip_similarity",
                     "general/fact_accuracy", "general/choice_accuracy", "general/describe/rougeL"]


def _num(x: Any) -> float | None:
    """A JSON number, or None for NaN / missing."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def ablation_summary(run_name: str, comparison: pd.DataFrame, selection: dict, report_dir: str,
                     scores: pd.DataFrame) -> dict:
    """The ablation's choice: variant, checkpoint, its metrics (mean over its seeds' chosen checkpoints), the
    interval on the selection metric and whether the top two overlap, and (from the per-model ``scores``) an
    interval on its colour hard-negative accuracy."""
    rows = comparison.set_index("label")
    labels = chosen_labels(selection)
    cols = [c for c in ABLATION_COLUMNS if c in comparison.columns]
    table = {label: {c: _num(rows.at[label, c]) for c in cols} for label in labels}
    winner = selection["winner"]
    mine = [s["label"] for s in winner["seeds"]]
    colour = "caption/hard_negative_accuracy/colour"
    return {
        "run": run_name, "selected": winner["variant"], "checkpoint": winner["checkpoint"],
        "metric": selection["rule"]["metric"], "value": _num(winner[selection["rule"]["metric"]]),
        "interval": selection.get("intervals", {}).get(winner["variant"]),
        "colour_hard_negative_accuracy": (_num(rows.loc[mine, colour].astype(float).mean())
                                          if colour in rows.columns else None),
        "colour_hard_negative_interval": winner_interval(selection, scores, colour),
        "inconclusive": selection.get("inconclusive"), "significance": selection.get("significance", ""),
        "per_seed_winners": selection.get("per_seed_winners"), "table": table, "report": report_dir,
    }


def selection_summary(run_name: str, decision: dict, evidence: pd.DataFrame, stage1: dict[str, dict],
                      merged_root: str, answers: dict[str, pd.DataFrame] | None = None) -> dict:
    """The weight choice: who is champion after the decision, against which incumbent, and the margin behind it
    (over the incumbent when there was one, else the best candidate over the runner-up) with its interval.
    ``answers`` (model -> its per-answer table, as the decision was made on) adds each model's colour fact accuracy
    with a bootstrap interval over clips (``colour_fact_interval``)."""
    primary = decision["rule"]["primary"]["metric"]
    inc = decision.get("incumbent") or None
    margin = (decision.get("against_incumbent") or {}).get(decision["winner"]) or decision.get("primary_difference") or {}
    rows = evidence.set_index("candidate")
    cols = [c for c in SELECTION_COLUMNS if c in evidence.columns]
    reg = decision["registry"]

    def per_candidate(metric: str) -> dict:
        return {c: _num(rows.at[c, metric]) for c in rows.index} if metric in rows.columns else {}

    return {
        "run": run_name, "status": decision["status"], "champion": decision["champion"],
        "champion_version": reg.get("champion"), "challenger": decision.get("challenger"),
        "challenger_version": reg.get("challenger"), "champion_uri": reg["champion_uri"],
        "incumbent": inc and {"label": inc["label"], "version": inc["version"], "candidate": inc.get("candidate", "")},
        "primary_metric": primary, "margin": _num(margin.get("estimate")), "ci_low": _num(margin.get("low")),
        "ci_high": _num(margin.get("high")), "confidence": decision["rule"]["confidence"],
        "margin_of": f"{margin['of']} - {margin['over']}" if margin else None,
        "colour_fact_accuracy": per_candidate(COLOUR_FACT),
        "colour_fact_interval": {c: colour_fact_interval(a, decision["rule"]) for c, a in (answers or {}).items()},
        "colour_choice_accuracy": per_candidate("billiards/choice/colour"),  # teacher-forced 6-way (chance 1/6)
        "colour_choice_wrong_video": per_candidate("billiards/wrong_video_choice/colour"),  # the same, another clip shown
        "explanation": decision["explanation"], "rule": decision["rule_text"],
        "metrics": {c: {m: _num(rows.at[c, m]) for m in cols} for c in rows.index},
        "stage1": stage1, "merged_dir": f"{merged_root}/{decision['winner']}/merged",
        "changes": decision.get("changes", []),
    }


def colour_fact_interval(answers: pd.DataFrame, rule: dict) -> dict:
    """A model's ``billiards/fact/colour`` with a bootstrap interval over clips at the rule's confidence. A clip's
    answers (its description and its questions) are resampled together: they read the same video, so resampling
    answers would treat correlated checks as independent and narrow the interval. With several training seeds, the
    seeds are resampled too, crossed with the clips (``hilight.experiments.bootstrap``)."""
    items = per_item(answers, COLOUR_FACT)
    items = items.groupby(level=[x for x in ("seed", "video_id") if x in items.index.names]).sum()
    return ratio_interval(items, confidence=rule["confidence"], n=rule["bootstrap_samples"]).as_dict()


def render_demo_summary(s: dict) -> str:
    """The printed demo summary, from ``outputs/demo_summary.json``'s dict alone."""
    d, a, ab, llm, sel = s["data"], s["alignment"], s["ablation"], s["llm"], s["selection"]
    out = ["=" * 72,
           f"data_validation run   {d['run']}",
           f"data fingerprint      {d['fingerprint']}",
           f"accepted / rejected   {d['counts']}",
           f"manifest              {d['manifest']}/{{videos,captions,qa}}.parquet",
           f"report                {d['report']}"]
    for label, m in a["runs"].items():
        out.append(f"{label:<22}run {m['run']}: held-out text->video R@1 {m['t2v_r1']:.3f} (random init "
                   f"{m['random_t2v_r1']:.3f}), median rank {m['t2v_median_rank']:.0f} (random init "
                   f"{m['random_t2v_median_rank']:.0f})")
    out.append(f"models                {a['models']}")
    out.append(f"ablation run          {ab['run']} (held-out billiards; each variant at its chosen checkpoint):")
    table = pd.DataFrame(ab["table"]).T
    table.columns = [c.split("/", 1)[1] for c in table.columns]
    out.append("    " + table.astype(float).round(3).to_string().replace("\n", "\n    "))
    iv = ab.get("interval")
    iv_text = f", {iv['confidence']:.0%} interval [{iv['low']:.3f}, {iv['high']:.3f}] over {iv['items']} clips" if iv else ""
    verdict = {True: "INCONCLUSIVE (the top two intervals overlap)", False: "significant (the top two intervals are apart)",
               None: "no interval for this metric"}[ab["inconclusive"]]
    out.append(f"selected variant      {ab['selected']} at {ab['checkpoint']}: {ab['metric']} {_fmt(ab['value'])}{iv_text}; "
               f"{verdict}")
    civ = ab.get("colour_hard_negative_interval")
    civ_text = f" [{civ['low']:.3f}, {civ['high']:.3f}] over {civ['items']} clips" if civ else ""
    out.append(f"                      colour hard-negative accuracy {_fmt(ab['colour_hard_negative_accuracy'])}{civ_text} "
               f"(chance 0.5); report {ab['report']}")
    if ab.get("per_seed_winners"):
        out.append(f"                      winner per training seed: {ab['per_seed_winners']}")
    out.append(f"demo LLM              run {llm['run']}: held-out text loss {llm['lm_loss']:.3f} (untrained "
               f"{llm['lm_loss_untrained']:.3f}); {llm['model']}")
    out.append(f"selection run         {sel['run']} (each candidate: stage 1 -> stage 2 -> merge -> evaluation)")
    for c, m in sel["stage1"].items():
        out.append(f"    stage 1 {c:<10}held-out answer loss {m['lm_loss']:.3f} (before training {m['lm_loss_initial']:.3f}; "
                   f"another clip's video {m['lm_loss_wrong_video']:.3f}; no video {m['lm_loss_no_video']:.3f})")
    metrics = pd.DataFrame(sel["metrics"])
    out.append("    " + metrics.map(_fmt).to_string().replace("\n", "\n    "))
    if sel.get("colour_fact_interval"):
        out.append("colour facts          " + ", ".join(
            f"{c} {iv['estimate']:.3f} [{iv['low']:.3f}, {iv['high']:.3f}]"
            for c, iv in sel["colour_fact_interval"].items()) +
            f" ({next(iter(sel['colour_fact_interval'].values()))['confidence']:.0%} over clips: the ball colour "
            "named in generated answers, one of six)")
    inc = sel["incumbent"]
    out.append(f"decision              {sel['status']}: {sel['explanation']}")
    out.append(f"                      rule: {sel['rule']}")
    if sel["margin"] is not None:
        against = "the incumbent " + inc["label"] if inc else "the runner-up"
        out.append(f"                      margin over {against}: {sel['margin_of']} on {sel['primary_metric']} "
                   f"{sel['margin']:+.3f} ({sel['confidence']:.0%} bootstrap interval {_fmt(sel['ci_low'], '+.3f')} .. "
                   f"{_fmt(sel['ci_high'], '+.3f')})")
    for change in sel.get("changes", []):
        out.append(f"                      {change}")
    out.append(f"champion              {sel['champion_uri']} = version {sel['champion_version']} ({sel['champion']}); "
               f"challenger = version {sel['challenger_version']} ({sel['challenger']})")
    out.append(f"MLflow store          {s['mlflow']['store']}")
    out.append(f"MLflow UI             {s['mlflow']['ui']}")
    out.append(f"ask the champion      {s['ask']}")
    if s.get("timings"):
        out.append("time                  " + ", ".join(f"{part} {sec:.0f} s" for part, sec in s["timings"].items()))
    out.append(f"summary               {s['path']} ({s['seconds']:.0f} s)")
    return "\n".join(out)


def _fmt(x: Any, spec: str = ".3f") -> str:
    if isinstance(x, bool) or x is None:
        return str(x) if x is not None else "n/a"
    return format(x, spec) if isinstance(x, (int, float)) else str(x)
