"""Data validation and ingestion: fingerprint -> load -> probe -> validate -> write manifest -> publish it."""

from __future__ import annotations

from typing import Any

from zenml import pipeline

from hilight.data.ingest import DataValidationConfig
from steps.data_validation import (
    fingerprint_data,
    load_annotations,
    probe_videos,
    publish_manifest,
    validate_data,
    write_manifest,
)


@pipeline
def data_validation(config: DataValidationConfig, contracts: dict[str, dict[str, Any]]):
    fingerprints = fingerprint_data(config)
    video_refs, caption_rows, qa_rows = load_annotations(config, fingerprints)
    video_facts = probe_videos(config, video_refs)
    valid_videos, valid_captions, valid_qa, quarantine, summary, ge_results = validate_data(
        contracts, video_facts, caption_rows, qa_rows)
    manifest_dir = write_manifest(config, contracts, fingerprints, valid_videos, valid_captions, valid_qa, quarantine,
                                  summary, ge_results)
    publish_manifest(manifest_dir)
    return manifest_dir
