"""Is the demo's decision stable? The reduced demo chain once per training seed, each in its own output dirs and
registry model (named with --tag, so reruns start without a champion), with the seed as the only difference: billiards alignment ("table1k", train.seed) → weight selection
(stage 1 and stage 2 of both candidates with train.seed; "original" stays the demo's general pretraining, the data
and the demo LLM stay the demo's). Prints one Markdown row per seed and writes benchmarks/results/demo_stability.json.

    make demo                                   # first: data, manifest, "original", demo LLM
    .venv/bin/python benchmarks/demo_stability.py --seeds 0 1 2

Per seed: table1k's held-out billiards t2v R@1 (and the random-init model's), its colour hard-negative accuracy on
held-out clips (the ablation's suite and scorer), each candidate's billiards colour-fact accuracy, the winner, the
primary-metric margin of the winner over the runner-up with its 95% paired bootstrap interval, and whether that
interval excludes 0. About 9-11 minutes per seed on 2 CPU cores (about 12 on the slower Zen 2 box).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_seed(seed: int, out: str, tag: str) -> dict:
    from hilight.config import load_config
    from hilight.experiments.ablation import AblationConfig, ModelRef, eval_suite, evaluate_models
    from pipelines.run import run_pipeline, step_output

    started = time.monotonic()
    align_dir = f"{out}/seed{seed}/alignment"
    run = run_pipeline("clipvip_alignment", ROOT / "configs/alignment_demo.yaml",
                       overrides=[f"output_dir={align_dir}", f"name=alignment_seed{seed}", f"train.seed={seed}"])
    heldout = step_output(run, "train_clipvip", "heldout_retrieval")

    # colour hard negatives of table1k on the ablation's held-out suite
    ablation = load_config(ROOT / "configs/ablation_demo.yaml", AblationConfig)
    best = ROOT / align_dir / "best"
    scored = evaluate_models([ModelRef("table1k", "best", 0, best, best / "tokenizer")], eval_suite(ablation),
                             ablation.eval).metrics.iloc[0]

    selection = run_pipeline("select_vision_weights", ROOT / "configs/select_vision_weights_demo.yaml", overrides=[
        f"output_dir={out}/seed{seed}/selection", f"name=stability_seed{seed}",
        f"candidates.table1k.clipvip={align_dir}/best", f"registry.model_name=hilight-vlm-stability-{tag}-seed{seed}",
        f"stage1_overrides={{train: {{seed: {seed}}}}}", f"stage2_overrides={{train: {{seed: {seed}}}}}"])
    decision = step_output(selection, "select_and_promote", "selection_decision")
    evidence = step_output(selection, "select_and_promote", "selection_evidence").set_index("candidate")
    margin = decision.get("primary_difference") or {}
    return {
        "seed": seed, "seconds": round(time.monotonic() - started),
        "t2v_r1": heldout["t2v_r1"], "t2v_r1_random": heldout["random_init/t2v_r1"],
        "colour_hard_negative_accuracy": float(scored["caption/hard_negative_accuracy/colour"]),
        "colour_fact": {c: float(evidence.at[c, "billiards/fact/colour"]) for c in evidence.index},
        "colour_choice": {c: float(evidence.at[c, "billiards/choice/colour"]) for c in evidence.index
                          if "billiards/choice/colour" in evidence.columns},
        "colour_choice_wrong_video": {c: float(evidence.at[c, "billiards/wrong_video_choice/colour"])
                                      for c in evidence.index if "billiards/wrong_video_choice/colour" in evidence.columns},
        "primary": decision["rule"]["primary"]["metric"],
        "primary_values": {c: float(evidence.at[c, decision["rule"]["primary"]["metric"]]) for c in evidence.index},
        "winner": decision["winner"], "margin_of": f"{margin.get('of')} - {margin.get('over')}",
        "margin": margin.get("estimate"), "ci_low": margin.get("low"), "ci_high": margin.get("high"),
        "excludes_zero": bool(margin) and (margin["low"] > 0 or margin["high"] < 0),
    }


def table(rows: list[dict]) -> str:
    out = ["| seed | table1k t2v R@1 (random init) | colour hard-neg acc | colour fact original / table1k | "
           "colour choice original / table1k (another clip's video) | winner | margin (95% CI) | excludes 0 |",
           "|---|---|---|---|---|---|---|---|"]
    nan = float("nan")
    for r in rows:
        cf, cc, cw = r["colour_fact"], r.get("colour_choice", {}), r.get("colour_choice_wrong_video", {})
        out.append(f"| {r['seed']} | {r['t2v_r1']:.3f} ({r['t2v_r1_random']:.3f}) | {r['colour_hard_negative_accuracy']:.3f} | "
                   f"{cf.get('original', nan):.3f} / {cf.get('table1k', nan):.3f} | "
                   f"{cc.get('original', nan):.3f} / {cc.get('table1k', nan):.3f} "
                   f"({cw.get('original', nan):.3f} / {cw.get('table1k', nan):.3f}) | {r['winner']} | "
                   f"{r['margin_of']} {r['margin']:+.3f} ({r['ci_low']:+.3f} .. {r['ci_high']:+.3f}) | "
                   f"{'yes' if r['excludes_zero'] else 'no'} |")
    winners = {r["winner"] for r in rows}
    out.append("")
    out.append(f"same winner for every seed: {'yes' if len(winners) == 1 else 'no'} ({', '.join(r['winner'] for r in rows)}); "
               f"interval excludes 0 for {sum(r['excludes_zero'] for r in rows)} of {len(rows)} seeds")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="outputs/stability", help="output root (relative to the project)")
    parser.add_argument("--json", default=str(ROOT / "benchmarks/results/demo_stability.json"))
    parser.add_argument("--tag", default=time.strftime("%Y%m%d%H%M"), help="in each seed's registry model name "
                        "(hilight-vlm-stability-<tag>-seed<N>), so a rerun is not compared with an earlier run's champion")
    args = parser.parse_args()
    if not (ROOT / "outputs/pretrain_general/best").is_dir() or not (ROOT / "outputs/llm_pretrain/model").is_dir():
        raise SystemExit("run `make demo` first: the stability runs reuse its data, 'original' weights and demo LLM")
    rows = []
    for seed in args.seeds:
        rows.append(run_seed(seed, args.out, args.tag))
        print(json.dumps(rows[-1]), flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
