"""MLflow lineage helpers: every run carries its resolved config, data fingerprint, git commit and
orchestrator run id, so a score table can be traced back to the data and code that made it."""

from __future__ import annotations

import json
import logging
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Mapping

from pydantic import BaseModel

from hilight.env import project_root

log = logging.getLogger(__name__)

TAG_FINGERPRINT = "hilight.data_fingerprint"
TAG_GIT_COMMIT = "hilight.git_commit"
TAG_GIT_DIRTY = "hilight.git_dirty"
TAG_ZENML_RUN = "hilight.zenml_run_id"
TAG_PIPELINE = "hilight.pipeline"


def git_state(root: Path | None = None) -> tuple[str, bool]:
    """(commit, dirty) of the project checkout, ``("unknown", False)`` outside git."""
    root = root or project_root()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False
    return commit, bool(status.strip())


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists become JSON strings."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{key}."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v, default=str)
        else:
            out[key] = v
    return out


def log_lineage(config: BaseModel | Mapping[str, Any], *, fingerprint: str | None, zenml_run_id: str | None,
                pipeline: str | None = None) -> None:
    """Tag the active MLflow run with lineage and log the resolved config (params + JSON artifact)."""
    import mlflow  # imported where used: training code imports this module on machines without MLflow

    resolved = config.model_dump(mode="json") if isinstance(config, BaseModel) else dict(config)
    commit, dirty = git_state()
    tags = {TAG_GIT_COMMIT: commit, TAG_GIT_DIRTY: str(dirty).lower()}
    if fingerprint:
        tags[TAG_FINGERPRINT] = fingerprint
    if zenml_run_id:
        tags[TAG_ZENML_RUN] = zenml_run_id
    if pipeline:
        tags[TAG_PIPELINE] = pipeline
    mlflow.set_tags(tags)
    params = {k: (str(v)[:6000] if v is not None else "None") for k, v in flatten(resolved).items()}
    existing = mlflow.active_run().data.params if mlflow.active_run() else {}
    # MLflow forbids changing a logged param; steps of one pipeline run share a run, so only add new ones
    params = {k: v for k, v in params.items() if k not in existing}
    for i in range(0, len(params), 100):
        mlflow.log_params(dict(list(params.items())[i:i + 100]))
    mlflow.log_dict(resolved, "config/resolved_config.json")


class ResilientTracker:
    """Per-step metrics and artifacts for one MLflow run that never crash the training calling it.

    Metrics are buffered and sent in batches (``log_batch``); when the tracking store is unreachable the batch
    stays in the buffer and is retried at the next flush, so an outage loses nothing that fits in ``max_buffer``.
    Artifact uploads that fail are retried at the next flush too. Without a run id everything is a no-op, so the
    library trains the same with or without MLflow."""

    def __init__(self, run_id: str | None, *, flush_every_s: float = 10.0, max_buffer: int = 200_000):
        self.run_id = run_id
        self.flush_every_s = flush_every_s
        self.max_buffer = max_buffer
        self._metrics: list = []
        self._artifacts: list[tuple[str, str | None]] = []
        self._last_flush = 0.0
        self._failing = False
        self.dropped = 0

    @classmethod
    def for_active_run(cls, **kwargs) -> ResilientTracker:
        import mlflow

        run = mlflow.active_run()
        return cls(run.info.run_id if run else None, **kwargs)

    @property
    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient()

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._metrics.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        if len(self._metrics) > self.max_buffer:  # bounded memory during a long outage: drop the oldest
            self.dropped += len(self._metrics) - self.max_buffer
            self._metrics = self._metrics[-self.max_buffer:]
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()

    def log_artifacts(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or a directory (queued and retried on failure)."""
        if self.run_id is not None:
            self._artifacts.append((str(local_path), artifact_path))
            self.flush()

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.run_id is None:
            return
        self._guard(lambda: [self.client.set_tag(self.run_id, k, str(v)) for k, v in tags.items()], "tags")

    def flush(self) -> bool:
        """Send what is buffered; True when nothing is left."""
        if self.run_id is None:
            return True
        self._last_flush = time.monotonic()
        while self._metrics:
            chunk = self._metrics[:1000]  # MLflow's log_batch limit
            if not self._guard(lambda c=chunk: self.client.log_batch(self.run_id, metrics=c), "metrics"):
                return False
            del self._metrics[:len(chunk)]
        while self._artifacts:
            local, dest = self._artifacts[0]
            upload = self.client.log_artifacts if Path(local).is_dir() else self.client.log_artifact
            if not self._guard(lambda: upload(self.run_id, local, dest), "artifacts"):
                return False
            self._artifacts.pop(0)
        return True

    def _guard(self, fn, what: str) -> bool:
        # Deliberately broad: any tracking failure (HTTP, DB lock, disk) must not stop training. It is logged,
        # once per outage, and the data stays queued.
        from mlflow.exceptions import MlflowException

        try:
            fn()
        except MlflowException as exc:
            if exc.error_code in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST"):  # our bug, not an outage: never retry
                log.error("MLflow rejected %s, which are dropped: %s", what, exc)
                return True
            return self._outage(exc, what)
        except Exception as exc:  # noqa: BLE001
            return self._outage(exc, what)
        if self._failing:
            log.warning("MLflow tracking recovered")
        self._failing = False
        return True

    def _outage(self, exc: Exception, what: str) -> bool:
        if not self._failing:
            log.warning("MLflow tracking failed (%s: %s); training continues and %s will be retried",
                        type(exc).__name__, exc, what)
        self._failing = True
        return False


Entry = tuple[list[str] | None, list[str] | None]  # (datasets or None = all, splits)
Roles = Mapping[str, Entry | list[Entry]]  # context -> one entry, or several (datasets read with different splits)


def log_manifest_inputs(manifest_dir: str | Path, roles: Roles) -> list[str]:
    """Record the validated data this run reads as MLflow dataset inputs, so the run page and the runs table's
    Dataset column say which data each run (and each model logged in it) came from.

    ``roles`` maps an MLflow input context (``"training"``, ``"evaluation"``) to the manifest's datasets read in
    that role (``None``: all of them) and their splits, or to a list of such pairs. Each dataset becomes a
    ``MetaDataset`` named ``dataset[splits]`` (MLflow keeps one input per name and digest, so the held-out splits of
    a training dataset stay a separate input), whose source is the manifest file and whose digest is the dataset's content fingerprint (its first 32
    hex digits: MLflow keeps 36 characters; the full value is the input's ``hilight.fingerprint`` tag). Returns
    ``"context:name"`` per input."""
    import warnings

    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    from hilight.data.manifest import open_manifest

    run_dir, meta = open_manifest(manifest_dir)
    fingerprints: dict[str, str] = meta.get("dataset_fingerprints", {})
    with warnings.catch_warnings():  # MLflow registers its local-file source twice ("" and "file:") and says so
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        source = resolve_dataset_source((run_dir / "manifest.json").as_uri())
    datasets, contexts, tags, logged = [], [], [], []
    pairs = [(context, entry) for context, entries in roles.items()
             for entry in ([entries] if isinstance(entries, tuple) else entries)]
    for context, (names, splits) in pairs:
        for name in sorted(fingerprints) if names is None else names:
            if name not in fingerprints:
                raise ValueError(f"dataset {name!r} is not in the manifest {run_dir} (it has {sorted(fingerprints)})")
            label = f"{name}[{'+'.join(splits)}]" if splits else name
            datasets.append(MetaDataset(source=source, name=label, digest=fingerprints[name][:32]))
            contexts.append(context)
            tags.append({"hilight.fingerprint": fingerprints[name], "hilight.manifest": str(run_dir)})
            logged.append(f"{context}:{label}")
    if datasets:
        mlflow.log_inputs(datasets=datasets, contexts=contexts, tags_list=tags)
    return logged


def data_roles(data: BaseModel) -> dict[str, Entry | list[Entry]]:
    """The datasets and splits a stage's ``data:`` block trains and validates on: ``train_datasets`` /
    ``val_datasets`` (``None`` = every dataset in the manifest), or the datasets of its ``sources`` (stage 2), where
    a source with ``holdout`` trains on its training splits less the held-out share and validates on that share,
    not on ``val_splits``."""
    train_splits, val_splits = getattr(data, "train_splits", None), getattr(data, "val_splits", None)
    sources = getattr(data, "sources", None)
    if not sources:
        both = getattr(data, "datasets", None)  # one list for both roles (the demo LLM's text corpus)
        roles: dict[str, Entry | list[Entry]] = {"training": (getattr(data, "train_datasets", both), train_splits)}
        if hasattr(data, "val_datasets") or hasattr(data, "val_splits"):
            roles["evaluation"] = (getattr(data, "val_datasets", both), val_splits)
        return roles
    holdout = {s.dataset: s.holdout for s in sources if s.holdout}  # one share per dataset (MixtureDataSpec)
    plain = sorted({s.dataset for s in sources} - set(holdout))
    train = "+".join(train_splits)
    training = [(plain, train_splits)] if plain else []
    evaluation = [(plain, val_splits)] if plain else []
    for name, share in sorted(holdout.items()):
        training.append(([name], [f"{train} less holdout {share:g}"]))
        evaluation.append(([name], [f"{train} holdout {share:g}"]))
    return {"training": training, "evaluation": evaluation}


@contextmanager
def tracked_training(tracking_uri: str, experiment: str, config: BaseModel, *, fingerprint: str | None,
                     tags: Mapping[str, str]) -> Iterator[ResilientTracker]:
    """An MLflow run for a training job started outside a pipeline (``hilight train --track``, also under
    ``accelerate launch``, where only the main process should enter it): lineage, the resolved config and the
    manifest's datasets it trains and validates on (as the pipeline steps log them) first, then per-step metrics and
    checkpoints through the yielded tracker. The run ends FAILED when training raises."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(tags=dict(tags)) as run:
        log_lineage(config, fingerprint=fingerprint, zenml_run_id=None, pipeline=experiment)
        log_manifest_inputs(config.data.manifest_dir, data_roles(config.data))
        tracker = ResilientTracker(run.info.run_id)
        try:
            yield tracker
        finally:
            tracker.flush()


def log_training_outcome(fit, *, run_dir: Path, best_dir: Path, artifact_path: str, table_dir: str,
                         metrics: Mapping[str, float] | None = None, rejected=None) -> None:
    """What a finished training job logs on the active run (a pipeline step's, or ``hilight train --track``'s):
    held-out metrics at its last step, the validation history and the rejected samples (as tables under
    ``table_dir``), the exported best model, and where the run lives (its directory, resume point, skipped steps)."""
    import mlflow
    import pandas as pd

    if metrics:
        mlflow.log_metrics(dict(metrics), step=fit.step)
    if fit.history:
        mlflow.log_table(pd.DataFrame(fit.history), artifact_file=f"{table_dir}/validation_history.json")
    if rejected is not None and not rejected.empty:
        mlflow.log_table(rejected, artifact_file=f"{table_dir}/rejected_samples.json")
    mlflow.log_artifacts(str(best_dir), artifact_path=artifact_path)
    mlflow.set_tags({"hilight.run_dir": str(run_dir), "hilight.resumed_from": str(fit.resumed_from),
                     "hilight.skipped_steps": str(fit.skipped_steps), "hilight.best_model": str(best_dir)})
