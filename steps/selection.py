"""Steps of ``select_vision_weights`` besides the per-stage ones in ``steps.vlm``: fingerprint (and validate) the
evaluation inputs, look up the incumbent champion and evaluate it on the same sets, then decide and promote.

The look-up and the decision are never cached: they read and move the live registry aliases. The incumbent's
evaluation is cached by its inputs, the champion's registry version and digest plus the evaluation fingerprints, so
an unchanged champion on unchanged data is evaluated once."""

from __future__ import annotations

import json
import logging
from typing import Annotated

import mlflow
import pandas as pd
from zenml import get_step_context, log_metadata, step

from hilight.env import resolve_path
from hilight.eval.vlm import VLMEvalSpec, eval_fingerprints, evaluate_vlm
from hilight.experiments.selection import (
    RegistrySpec,
    SelectionConfig,
    decide,
    pool_seeds,
    validate_event_logs,
    write_decision_report,
)
from hilight.registry import CHECKED_TAG, DATASET_TAG, DIGEST_TAG, local_model_dir, register, set_alias
from hilight.retrain import dataset_fingerprints
from hilight.tracking import log_lineage, log_manifest_inputs
from steps import EXPERIMENT_TRACKER

log = logging.getLogger(__name__)


@step(enable_cache=False)
def locate_eval_inputs(spec: VLMEvalSpec, contracts_dir: str = "data_contracts",
                       out_dir: str = "outputs/selection") -> Annotated[dict[str, str], "eval_inputs"]:
    """Hashes of the held-out manifest, event files and judge weights, after the event files passed their data
    contract; never cached, it keys the evaluations."""
    rejected = validate_event_logs(spec, contracts_dir, out_dir)
    log_metadata({"eval_file_rejects": {k.removeprefix("rejected:"): int(v) for k, v in rejected.items()}})
    return {**eval_fingerprints(spec), **rejected}


@step(enable_cache=False)
def locate_incumbent(registry: RegistrySpec) -> Annotated[dict[str, str], "incumbent"]:
    """The model version behind ``<model_name>@<champion_alias>`` (version, digest, URI, candidate), or ``{}``
    when there is none yet. Never cached: the alias moves between runs."""
    from zenml.client import Client

    tracker = Client().active_stack.experiment_tracker
    client = mlflow.MlflowClient(tracking_uri=tracker.get_tracking_uri() if tracker else None)
    try:
        mv = client.get_model_version_by_alias(registry.model_name, registry.champion_alias)
    except mlflow.exceptions.MlflowException:
        log.info("no %s@%s yet: the best candidate becomes the champion", registry.model_name, registry.champion_alias)
        return {}
    return {"label": f"champion-v{mv.version}", "version": str(mv.version), "digest": mv.tags.get(DIGEST_TAG, ""),
            "model_uri": f"models:/{registry.model_name}/{mv.version}", "candidate": mv.tags.get("hilight.candidate", "")}


@step(experiment_tracker=EXPERIMENT_TRACKER)
def evaluate_incumbent(spec: VLMEvalSpec, incumbent: dict[str, str], eval_inputs: dict[str, str],
                       cache_dir: str) -> tuple[
    Annotated[dict[str, float], "incumbent_metrics"],
    Annotated[pd.DataFrame, "incumbent_answers"],
]:
    """The champion's answers and metrics on the current evaluation sets (empty without a champion), scored
    exactly as the candidates are by ``evaluate_model``."""
    if not incumbent:  # the step's tracker run exists either way: say why it holds no metrics
        mlflow.set_tags({"hilight.stage": "evaluation-skipped", "hilight.candidate": "none",
                         "mlflow.note.content": "No champion was registered when this selection ran, so there was no "
                                                "incumbent to evaluate; the best candidate is compared with nothing."})
        return {}, pd.DataFrame()
    mlflow.set_tags({"hilight.stage": "evaluation", "hilight.candidate": incumbent["label"],
                     "hilight.model_uri": incumbent["model_uri"], "hilight.data_fingerprint": eval_inputs["data_fingerprint"],
                     "hilight.zenml_run_id": str(get_step_context().pipeline_run.id)})
    from hilight.models.export import load_vlm_dir

    result = evaluate_vlm(load_vlm_dir(local_model_dir(incumbent["model_uri"], resolve_path(cache_dir))), spec)
    metrics = {k: v for k, v in result.metrics.items() if v == v}  # NaN-free
    mlflow.log_metrics(metrics)
    mlflow.log_table(result.loggable_answers(),
                     artifact_file="evaluation/answers.json")
    log_metadata({"candidate": incumbent["label"], "version": incumbent["version"], **metrics})
    return metrics, result.answers


@step(enable_cache=False, experiment_tracker=EXPERIMENT_TRACKER)
def select_and_promote(config: SelectionConfig, models: list[dict[str, str]], metrics: list[dict[str, float]],
                       answers: list[pd.DataFrame], incumbent: dict[str, str] | None = None,
                       incumbent_metrics: dict[str, float] | None = None,
                       incumbent_answers: pd.DataFrame | None = None) -> tuple[
    Annotated[dict, "selection_decision"],
    Annotated[pd.DataFrame, "selection_evidence"],
]:
    """Apply the declared rule to the candidates (and the incumbent champion, when there is one), record the
    decision and its evidence (JSON, Markdown report, plot) on this run and the model versions, and move the
    ``champion`` / ``challenger`` aliases as the decision says."""
    ctx = get_step_context()
    run = ctx.pipeline_run
    names = list(config.candidates)
    pooled = pool_seeds(config, models, metrics, answers)  # with `seeds:`, one entry per candidate from here on
    models, metrics, answers = pooled["models"], pooled["metrics"], pooled["answers"]
    log_lineage(config, fingerprint=models[0]["data_fingerprint"], zenml_run_id=str(run.id), pipeline=run.pipeline.name)
    log_manifest_inputs(config.evaluation.manifest_dir, {"evaluation": (config.evaluation.datasets,
                                                                        config.evaluation.splits)})
    rows = [{"candidate": n, "clipvip": m["clipvip"], "model_uri": m["model_uri"], "digest": m["digest"], **mt}
            for n, m, mt in zip(names, models, metrics, strict=True)]
    by_answers = dict(zip(names, answers, strict=True))
    incumbent = incumbent or None
    if incumbent:
        rows.append({"candidate": incumbent["label"], "clipvip": "", "model_uri": incumbent["model_uri"],
                     "digest": incumbent["digest"], **(incumbent_metrics or {})})
        by_answers[incumbent["label"]] = (incumbent_answers if config.seeds is None else  # paired with every seed
                                          pd.concat([incumbent_answers.assign(seed=s) for s in config.seeds]))
    evidence = pd.DataFrame(rows)
    decision = decide(evidence, config.rule, answers=by_answers, incumbent=incumbent)
    decision["per_seed"] = pooled["per_seed"]  # each seed's values and winner, or None
    rank = {r["candidate"]: i + 1 for i, r in enumerate(decision["ranking"])}
    evidence["rank"] = evidence["candidate"].map(rank)
    evidence["passed_guards"] = evidence["candidate"].map(
        {c: all(g[c]["passed"] for g in decision["guards"].values()) for c in evidence["candidate"]})
    evidence = evidence.sort_values("rank", na_position="first").reset_index(drop=True)

    reg = config.registry
    client = mlflow.MlflowClient()
    before = {a: _alias_version(client, reg.model_name, a) for a in (reg.champion_alias, reg.challenger_alias)}
    # the raw per-dataset fingerprints the models were trained on: `hilight retrain --if-new-data` compares them
    sources = dataset_fingerprints(config.evaluation.manifest_dir)
    zenml_version = f"{ctx.model.name}:{ctx.model.version}" if ctx.model else ""
    by_model = dict(zip(names, models, strict=True))
    versions = {incumbent["label"]: incumbent["version"]} if incumbent else {}
    for name in dict.fromkeys(n for n in (decision["champion"], decision["challenger"]) if n in by_model):
        model = by_model[name]
        tags = {"hilight.candidate": name, "hilight.clipvip": model["clipvip"],
                "hilight.data_fingerprint": model["data_fingerprint"], "hilight.zenml_model_version": zenml_version,
                "hilight.selection_mlflow_run": mlflow.active_run().info.run_id,
                f"hilight.metric.{config.rule.primary.metric}": str(evidence.set_index("candidate").at[name, config.rule.primary.metric]),
                **{f"{DATASET_TAG}{d}": fp for d, fp in sources.items()}}
        versions[name] = register(model["model_uri"], model["digest"], reg.model_name, tags)
    champion, challenger = versions[decision["champion"]], versions.get(decision["challenger"])
    if challenger == champion:  # one model cannot be both; an "unchanged" champion keeps no challenger of itself
        challenger = None
    why = f"selection run {mlflow.active_run().info.run_id}, decision {decision['status']}"
    set_alias(reg.model_name, reg.champion_alias, champion, reason=f"{decision['champion']} ({why}); rule: "
              f"{decision['rule_text'][:300]}")
    # the data the champion was last judged on (a held-back retrain leaves its training fingerprints as they were)
    for d, fp in sources.items():
        client.set_model_version_tag(reg.model_name, champion, f"{CHECKED_TAG}{d}", fp)
    held = "; ".join(map(str, decision.get("held_back") or []))[:300]
    set_alias(reg.model_name, reg.challenger_alias, challenger,
              reason=f"{decision['challenger'] or 'no candidate'}, runner-up to {decision['champion']} ({why})"
              + (f"; held back: {held}" if held else ""))
    after = {reg.champion_alias: champion, reg.challenger_alias: challenger}
    decision["registry"] = {"model_name": reg.model_name, **after, "before": before,
                            "champion_uri": f"models:/{reg.model_name}@{reg.champion_alias}"}
    decision["changes"] = [f"{a}: version {before[a] or 'none'} -> {after[a] or 'none'}"
                           + ("" if before[a] != after[a] else " (unchanged)") for a in after]
    decision["zenml_model_version"] = zenml_version

    report = write_decision_report(decision, evidence, resolve_path(config.output_dir) / "decision")
    run_id = mlflow.active_run().info.run_id
    summary = json.dumps({k: decision[k] for k in ("status", "champion", "challenger", "held_back", "changes")}
                         | {"selection_mlflow_run": run_id, "margin": decision.get("against_incumbent", {})
                            .get(decision["winner"], decision.get("primary_difference"))}, default=str)[:4900]
    for version in {v for v in (champion, challenger, versions.get(decision["winner"])) if v}:
        client.set_model_version_tag(reg.model_name, version, "hilight.selection_decision", summary)
        client.set_model_version_tag(reg.model_name, version, "hilight.selection_report",
                                     f"runs:/{run_id}/selection/decision.md")
    mlflow.set_tags({"hilight.stage": "selection", "hilight.champion": decision["champion"],
                     "hilight.champion_version": champion, "hilight.selection_status": decision["status"],
                     "hilight.selection_rule": decision["rule_text"][:4900]})
    mlflow.log_table(evidence, artifact_file="selection/evidence.json")
    for path in report.values():
        mlflow.log_artifact(str(path), artifact_path="selection")
    primary = config.rule.primary.metric
    for name, value in evidence.set_index("candidate")[primary].items():
        mlflow.log_metric(f"{name}/{primary}", float(value))
    log.info("selection decision (%s)\n%s", report["markdown"], report["markdown"].read_text())
    meta = {"winner": decision["winner"], "runner_up": decision["runner_up"] or "", "status": decision["status"],
            "champion": decision["champion"], "rule": decision["rule_text"], "champion_version": champion,
            "decision": json.dumps(decision, default=str)[:5000]}
    log_metadata(meta)
    if ctx.model:
        log_metadata(meta, infer_model=True)
        if decision["promoted"]:
            ctx.model.set_stage("production", force=True)
    return decision, evidence


def _alias_version(client: mlflow.MlflowClient, model_name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(model_name, alias).version)
    except mlflow.exceptions.MlflowException:
        return None
