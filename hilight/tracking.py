"""MLflow lineage helpers: every run carries its resolved config, data fingerprint, git commit and
orchestrator run id, so a score table can be traced back to the data and code that made it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Mapping

import mlflow
from pydantic import BaseModel

from hilight.env import project_root

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
