"""Retraining when new data arrives: compare the watched datasets' fingerprints with those recorded on the
champion, and say whether (and why) a retrain is due.

A dataset fingerprint is the content hash of its annotation files and every file in its video directory
(``hilight.data.ingest.fingerprint_dataset``): cheap next to training (no decoding), independent of where the
data lives, and taken through the stat-keyed hash cache (``hilight.data.hashcache``), so a check on unchanged data
costs one ``stat`` per file (``hilight retrain --rehash`` reads every byte again). ``select_vision_weights`` tags
each registered version with the fingerprints of the data it was trained on (``hilight.dataset_fingerprint.<name>``),
so the check needs only the registry and the files.

The sequence a retrain runs (validation → the listed training configs → selection) is wired in
``pipelines.run.run_retrain``; this module holds the config and the decision, and imports no ZenML.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from hilight.config import ConfigError, load_config
from hilight.data.hashcache import HashCache
from hilight.data.ingest import DataValidationConfig, fingerprint_dataset
from hilight.data.manifest import open_manifest
from hilight.env import resolve_path
from hilight.registry import CHECKED_TAG, DATASET_TAG


class ScheduleSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cron_expression: str = "0 3 * * *"  # daily at 03:00, for orchestrators that run ZenML schedules


class FeatureCachePrune(BaseModel):
    """After a retrain, delete feature-cache directories beyond the ``keep`` most recently used (those the retrain's
    candidates just read come first); with ``unused_days``, only those also unused for that many days."""

    model_config = ConfigDict(extra="forbid")

    dir: str = "outputs/feature_cache"  # the stage configs' features.dir
    keep: int = Field(2, ge=1)  # at least the candidates of one selection (the demo has two)
    unused_days: float | None = Field(None, ge=0)


class RetrainConfig(BaseModel):
    """Config of ``hilight retrain`` (``configs/retrain_*.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    pipeline: Literal["retrain"] = "retrain"
    watch: list[str] = Field(default_factory=lambda: ["billiards"], min_length=1)  # datasets whose change retrains
    data_validation: str = "configs/data_validation_demo.yaml"
    training: list[str] = Field(default_factory=list)  # pipeline configs run before the selection, in order
    selection: str = "configs/select_vision_weights_demo.yaml"
    lock_file: str = "outputs/retrain.lock"
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    # each retrain with new vision weights adds a feature-cache directory (terabytes at Valley-703K scale);
    # set this to prune after every successful retrain, under the retrain lock (None: never)
    prune_feature_cache: FeatureCachePrune | None = None


@dataclass
class RetrainCheck:
    due: bool
    reason: str
    current: dict[str, str]  # watched dataset -> fingerprint of the files now
    recorded: dict[str, str]  # watched dataset -> fingerprint on the champion ("" when none)


def watched_fingerprints(config: RetrainConfig, *, rehash: bool | None = None) -> dict[str, str]:
    """Fingerprints of the watched datasets now; ``rehash`` (default: ``HILIGHT_REHASH``) reads every file again."""
    validation = load_config(resolve_path(config.data_validation), DataValidationConfig)
    specs = {d.name: d for d in validation.datasets}
    unknown = sorted(set(config.watch) - set(specs))
    if unknown:
        raise ConfigError(f"watched datasets {unknown} are not in {config.data_validation} (it has {sorted(specs)}); "
                          "fix `watch:` in the retrain config")
    with HashCache(rehash=rehash, workers=max(2, validation.probe.workers)) as cache:  # unchanged files: one stat each
        return {name: fingerprint_dataset(specs[name], cache=cache) for name in config.watch}


def champion_fingerprints(model_name: str, alias: str = "champion") -> dict[str, str] | None:
    """The dataset fingerprints tagged on ``model_name@alias``; ``None`` when there is no such model version. A
    champion that a later selection kept (the new candidates did not beat it) counts as checked on that data
    (``hilight.checked_dataset_fingerprint.*``), so the same data does not trigger another retrain."""
    import mlflow

    client = mlflow.MlflowClient()
    try:
        version = client.get_model_version_by_alias(model_name, alias)
    except mlflow.exceptions.MlflowException:
        return None
    trained = {k[len(DATASET_TAG):]: v for k, v in version.tags.items() if k.startswith(DATASET_TAG)}
    checked = {k[len(CHECKED_TAG):]: v for k, v in version.tags.items() if k.startswith(CHECKED_TAG)}
    return {**trained, **checked}


def check_new_data(config: RetrainConfig, model_name: str) -> RetrainCheck:
    current = watched_fingerprints(config)
    recorded = champion_fingerprints(model_name)
    if recorded is None:
        return RetrainCheck(True, f"there is no {model_name}@champion yet", current, {})
    changed = [d for d in config.watch if recorded.get(d) != current[d]]
    if not changed:
        return RetrainCheck(False, f"{', '.join(config.watch)} unchanged since the champion was trained", current,
                            {d: recorded.get(d, "") for d in config.watch})
    return RetrainCheck(True, f"new data in {', '.join(changed)} (fingerprint differs from the champion's)", current,
                        {d: recorded.get(d, "") for d in config.watch})


def selection_model_name(config: RetrainConfig) -> str:
    """The registry name the selection config promotes into."""
    from hilight.experiments.selection import SelectionConfig

    return load_config(resolve_path(config.selection), SelectionConfig).registry.model_name


def dataset_fingerprints(manifest_dir: str | Path) -> dict[str, str]:
    """The raw per-dataset fingerprints a validated manifest was built from (``manifest.json``); a missing or failed
    manifest is refused (``hilight.data.manifest.open_manifest``)."""
    return dict(open_manifest(manifest_dir)[1].get("dataset_fingerprints", {}))
