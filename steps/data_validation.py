"""Steps of the ``data_validation`` pipeline: fingerprint -> load -> probe -> validate -> write."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import mlflow
import pandas as pd
from zenml import get_step_context, log_metadata, step

from hilight.data import ingest
from hilight.data.contracts import DataContract
from hilight.data.manifest import republish
from hilight.env import resolve_path
from hilight.tracking import log_lineage
from steps import EXPERIMENT_TRACKER

log = logging.getLogger(__name__)


def _contracts(raw: dict[str, dict[str, Any]]) -> dict[str, DataContract]:
    return {table: DataContract.model_validate(c) for table, c in raw.items()}


@step(enable_cache=False)
def fingerprint_data(config: ingest.DataValidationConfig) -> Annotated[dict[str, str], "data_fingerprints"]:
    """Hash the data on disk. Never cached: its *value* is what keys the cache of every later step,
    so new data under the same path is always seen."""
    fingerprints = ingest.fingerprint_datasets(config)
    log.info("data fingerprint %s", fingerprints["combined"])
    return fingerprints


@step
def load_annotations(config: ingest.DataValidationConfig, fingerprints: dict[str, str]) -> tuple[
    Annotated[pd.DataFrame, "video_refs"],
    Annotated[pd.DataFrame, "caption_rows"],
    Annotated[pd.DataFrame, "qa_rows"],
]:
    """Parse caption tables and QA files into rows with the facts the contracts check.

    ``fingerprints`` is unused in the body on purpose: as an input it puts the data's content
    hash into this step's cache key."""
    tables = ingest.load_tables(config)
    return tables.videos, tables.captions, tables.qa


@step
def probe_videos(config: ingest.DataValidationConfig, video_refs: pd.DataFrame) -> Annotated[pd.DataFrame, "video_facts"]:
    """Decode every new or changed referenced video with decord, in parallel (cached results for the others)."""
    return ingest.probe_videos(video_refs, config.probe, progress=config.progress, rehash=config.rehash or None)


@step
def validate_data(
    contracts: dict[str, dict[str, Any]], video_facts: pd.DataFrame, caption_rows: pd.DataFrame, qa_rows: pd.DataFrame
) -> tuple[
    Annotated[pd.DataFrame, "valid_videos"],
    Annotated[pd.DataFrame, "valid_captions"],
    Annotated[pd.DataFrame, "valid_qa"],
    Annotated[pd.DataFrame, "quarantine"],
    Annotated[pd.DataFrame, "validation_summary"],
    Annotated[dict[str, Any], "ge_results"],
]:
    """Run the Great Expectations suites compiled from the contracts; split accepted/rejected rows."""
    v = ingest.validate_tables(ingest.Tables(video_facts, caption_rows, qa_rows), _contracts(contracts))
    ge = {"results": v.ge_results, "table_failures": v.table_failures}
    return v.valid["videos"], v.valid["captions"], v.valid["qa"], v.quarantine, v.summary, ge


@step(experiment_tracker=EXPERIMENT_TRACKER)
def write_manifest(
    config: ingest.DataValidationConfig,
    contracts: dict[str, dict[str, Any]],
    fingerprints: dict[str, str],
    valid_videos: pd.DataFrame,
    valid_captions: pd.DataFrame,
    valid_qa: pd.DataFrame,
    quarantine: pd.DataFrame,
    validation_summary: pd.DataFrame,
    ge_results: dict[str, Any],
) -> Annotated[str, "manifest_dir"]:
    """Write manifests, quarantine, GE JSON and report; log them to MLflow; fail past the threshold. Returns the
    run directory's path: the files are versioned on disk and logged to MLflow, and a ``Path`` artifact would copy
    them (Valley-scale manifests) into the artifact store a third time, and hand the next step that copy."""
    parsed = _contracts(contracts)
    validation = ingest.Validation(
        valid={"videos": valid_videos, "captions": valid_captions, "qa": valid_qa}, quarantine=quarantine,
        summary=validation_summary, ge_results=ge_results["results"], table_failures=ge_results["table_failures"])
    result = ingest.write_outputs(validation, fingerprints, config, parsed, resolve_path(config.output_dir))

    run = get_step_context().pipeline_run
    log_lineage(config, fingerprint=fingerprints["combined"], zenml_run_id=str(run.id), pipeline="data_validation")
    mlflow.set_tags({f"hilight.fingerprint.{k}": v for k, v in fingerprints.items() if k != "combined"})
    mlflow.set_tags({"hilight.manifest_status": result.status, "hilight.manifest_run": str(result.output_dir)})
    mlflow.log_params({f"contract.{t}": c.suite_name for t, c in parsed.items()})
    metrics = {k: float(v) for k, v in result.counts.items()}
    for r in validation_summary.itertuples(index=False):
        metrics[f"reject_rate.{r.table}.{r.dataset}"] = float(r.reject_fraction)
    total = validation_summary.groupby("table")[["total", "rejected"]].sum()
    for table, r in total.iterrows():
        metrics[f"reject_rate.{table}"] = float(r["rejected"] / r["total"]) if r["total"] else 0.0
    mlflow.log_metrics(metrics)
    mlflow.log_artifacts(str(result.output_dir), artifact_path="data_validation")
    mlflow.log_table(validation_summary, artifact_file="data_validation/summary_table.json")
    log_metadata({"data_fingerprint": fingerprints["combined"], **result.counts})
    ingest.check_thresholds(result, validation)
    return str(result.output_dir)


@step(enable_cache=False)
def publish_manifest(manifest_dir: str) -> Annotated[str, "current_manifest"]:
    """Point ``current`` at this run's manifest, also when ``write_manifest`` came from the cache (same data as an
    earlier run, but not as the last one): readers follow ``current`` and must see the data this run validated."""
    return str(republish(Path(manifest_dir)))
