"""Steps of ``select_vision_weights`` besides the per-stage ones in ``steps.vlm``: fingerprint the evaluation inputs,
then decide and promote. The decision step is never cached: it reads and moves the live registry aliases."""

from __future__ import annotations

import json
import logging
from typing import Annotated

import mlflow
import pandas as pd
from zenml import get_step_context, log_metadata, step

from hilight.experiments.selection import SelectionConfig, decide, paired_difference
from hilight.eval.vlm import VLMEvalSpec, eval_fingerprints
from hilight.registry import DATASET_TAG, register, set_alias
from hilight.retrain import dataset_fingerprints
from hilight.tracking import log_lineage
from steps import EXPERIMENT_TRACKER

log = logging.getLogger(__name__)


@step(enable_cache=False)
def locate_eval_inputs(spec: VLMEvalSpec) -> Annotated[dict[str, str], "eval_inputs"]:
    """Hashes of the held-out manifest, event files and judge weights; never cached, it keys the evaluations."""
    return eval_fingerprints(spec)


@step(enable_cache=False, experiment_tracker=EXPERIMENT_TRACKER)
def select_and_promote(config: SelectionConfig, models: list[dict[str, str]], metrics: list[dict[str, float]],
                       answers: list[pd.DataFrame]) -> tuple[
    Annotated[dict, "selection_decision"],
    Annotated[pd.DataFrame, "selection_evidence"],
]:
    """Apply the declared rule to the candidates' metrics, record the decision and its evidence, register the
    models in the MLflow Model Registry and point ``champion`` at the winner, ``challenger`` at the runner-up."""
    ctx = get_step_context()
    run = ctx.pipeline_run
    names = list(config.candidates)
    log_lineage(config, fingerprint=models[0]["data_fingerprint"], zenml_run_id=str(run.id), pipeline=run.pipeline.name)
    evidence = pd.DataFrame([{"candidate": n, "clipvip": m["clipvip"], "model_uri": m["model_uri"], "digest": m["digest"],
                              **mt} for n, m, mt in zip(names, models, metrics, strict=True)])
    decision = decide(evidence, config.rule)
    by_name = dict(zip(names, zip(models, answers, strict=True), strict=True))
    winner, runner_up = decision["winner"], decision["runner_up"]
    if runner_up is not None:
        mean, low, high = paired_difference(by_name[winner][1], by_name[runner_up][1], config.rule.primary.metric)
        decision["primary_difference"] = {"mean": mean, "ci95": [low, high], "pairs": "same questions, both models"}
    evidence["rank"] = evidence["candidate"].map({r["candidate"]: i + 1 for i, r in enumerate(decision["ranking"])})
    evidence["passed_guards"] = evidence["candidate"].map({r["candidate"]: r["passed_guards"] for r in decision["ranking"]})
    evidence = evidence.sort_values("rank").reset_index(drop=True)

    # the raw per-dataset fingerprints the models were trained on: `hilight retrain --if-new-data` compares them
    sources = dataset_fingerprints(config.evaluation.manifest_dir)
    reg = config.registry
    zenml_version = f"{ctx.model.name}:{ctx.model.version}" if ctx.model else ""
    versions = {}
    for name in [winner, runner_up] if runner_up else [winner]:
        model = by_name[name][0]
        tags = {"hilight.candidate": name, "hilight.clipvip": model["clipvip"],
                "hilight.data_fingerprint": model["data_fingerprint"], "hilight.zenml_model_version": zenml_version,
                "hilight.selection_mlflow_run": mlflow.active_run().info.run_id,
                f"hilight.metric.{config.rule.primary.metric}": str(evidence.set_index("candidate").at[name, config.rule.primary.metric]),
                **{f"{DATASET_TAG}{d}": fp for d, fp in sources.items()}}
        versions[name] = register(model["model_uri"], model["digest"], reg.model_name, tags)
    set_alias(reg.model_name, reg.champion_alias, versions[winner])
    set_alias(reg.model_name, reg.challenger_alias, versions.get(runner_up))
    decision["registry"] = {"model_name": reg.model_name, reg.champion_alias: versions[winner],
                            reg.challenger_alias: versions.get(runner_up),
                            "champion_uri": f"models:/{reg.model_name}@{reg.champion_alias}"}
    decision["zenml_model_version"] = zenml_version

    mlflow.set_tags({"hilight.stage": "selection", "hilight.champion": winner,
                     "hilight.champion_version": versions[winner], "hilight.selection_rule": decision["rule_text"]})
    mlflow.log_table(evidence, artifact_file="selection/evidence.json")
    mlflow.log_dict(decision, "selection/decision.json")
    primary = config.rule.primary.metric
    for name, value in evidence.set_index("candidate")[primary].items():
        mlflow.log_metric(f"{name}/{primary}", float(value))
    log.info("selected %s (%s); champion = %s v%s", winner, decision["rule_text"], reg.model_name, versions[winner])
    summary = {"winner": winner, "runner_up": runner_up or "", "rule": decision["rule_text"],
               "champion_version": versions[winner], "decision": json.dumps(decision, default=str)[:5000]}
    log_metadata(summary)
    if ctx.model:
        log_metadata(summary, infer_model=True)
        ctx.model.set_stage("production", force=True)
    return decision, evidence
