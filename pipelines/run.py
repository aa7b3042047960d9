"""Run a pipeline by name with a typed YAML config on the project-local stack."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from pathlib import Path

from hilight.config import import_object, load_config
from hilight.data.contracts import load_contracts
from hilight.env import resolve_path
from pipelines import PIPELINES
from pipelines.stack import configure_zenml, ensure_stack

log = logging.getLogger(__name__)


def run_pipeline(name: str, config_path: Path, *, enable_cache: bool | None = None, run_name: str | None = None,
                 overrides: Sequence[str] = ()):
    """Validate the config (with ``key.path=value`` ``overrides`` applied: the resolved config is what the steps
    receive, MLflow records and the run directories hash), make sure the stack exists, run the pipeline; returns the
    ZenML run."""
    if name not in PIPELINES:
        raise KeyError(f"unknown pipeline {name!r}; choose one of {sorted(PIPELINES)}")
    module_name, config_ref = PIPELINES[name]
    config = load_config(config_path, import_object(config_ref), overrides)
    if getattr(config, "pipeline", name) != name:
        raise ValueError(f"{config_path} is a config for pipeline {config.pipeline!r}, not {name!r}")
    configure_zenml()
    ensure_stack()
    pipeline = getattr(importlib.import_module(module_name), name)
    kwargs = {"config": config}
    if name == "data_validation":
        kwargs["contracts"] = {t: c.model_dump(mode="json") for t, c in load_contracts(resolve_path(config.contracts_dir)).items()}
    options = {
        "enable_cache": config.enable_cache if enable_cache is None else enable_cache,
        "settings": {"experiment_tracker.mlflow": {"experiment_name": getattr(config, "experiment_name", name)}},
    }
    if run_name:
        options["run_name"] = run_name
    if hasattr(config, "registry"):  # selection runs create a version of the ZenML model the registry model mirrors
        from zenml import Model

        options["model"] = Model(name=config.registry.model_name,
                                 description="HiLight VLM; versions come from select_vision_weights runs")
    try:
        return pipeline.with_options(**options)(**kwargs)
    except RuntimeError as exc:
        raise PipelineFailedError(_failure_message(name, exc)) from exc


class PipelineFailedError(RuntimeError):
    """A pipeline run failed; the message carries the failed steps' own error messages."""


def _failure_message(name: str, exc: RuntimeError) -> str:
    """ZenML only says which step failed; add what the step itself raised (e.g. a contract's reasons)."""
    from zenml.client import Client
    from zenml.enums import ExecutionStatus

    runs = Client().list_pipeline_runs(pipeline_name=name, sort_by="desc:created", size=1)
    if not runs.items:
        return str(exc)
    run = runs.items[0]
    failed = [f"step {step_name}: {step.exception_info.message}" for step_name, step in run.steps.items()
              if step.status == ExecutionStatus.FAILED and step.exception_info and step.exception_info.message]
    return f"pipeline {name} run {run.name} failed: " + ("; ".join(failed) or str(exc))


def step_output(run, step_name: str, output_name: str):
    """Load a named output of a finished run's step (ZenML lists one artifact version per output name)."""
    output = run.steps[step_name].outputs[output_name]
    return (output[0] if isinstance(output, list) else output).load()


class RetrainLockedError(RuntimeError):
    """Another retrain holds the lock."""


def run_retrain(config_path: Path, *, if_new_data: bool) -> dict:
    """``hilight retrain``: under a lock, check the watched datasets against the champion; when new (or not
    ``if_new_data``), run data_validation → each training config → select_vision_weights. Returns what happened."""
    import mlflow
    import yaml
    from filelock import FileLock, Timeout

    from hilight.retrain import RetrainConfig, check_new_data, selection_model_name
    from pipelines.stack import mlflow_tracking_uri

    config = load_config(config_path, RetrainConfig)
    configure_zenml()
    ensure_stack()
    mlflow.set_tracking_uri(mlflow_tracking_uri())
    lock_path = resolve_path(config.lock_file)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RetrainLockedError(f"another retrain holds {lock_path}; it runs one at a time. Wait for it to finish "
                                 "(a lock left by a killed process is released by the OS with the process)") from None
    try:
        check = check_new_data(config, selection_model_name(config))
        out = {"due": check.due, "reason": check.reason, "current": check.current, "recorded": check.recorded, "runs": []}
        if if_new_data and not check.due:
            return out
        out["runs"].append(run_pipeline("data_validation", resolve_path(config.data_validation)).name)
        for cfg in config.training:
            path = resolve_path(cfg)
            out["runs"].append(run_pipeline(yaml.safe_load(path.read_text())["pipeline"], path).name)
        selection = run_pipeline("select_vision_weights", resolve_path(config.selection))
        out["runs"].append(selection.name)
        out["decision"] = step_output(selection, "select_and_promote", "selection_decision")
        return out
    finally:
        lock.release()


def schedule_selection(config_path: Path):
    """Register ``select_vision_weights`` on the active stack with the retrain config's cron schedule; fails with
    a clear message on orchestrators that do not run schedules (the local one)."""
    from zenml.client import Client
    from zenml.config.schedule import Schedule

    from hilight.retrain import RetrainConfig

    config = load_config(config_path, RetrainConfig)
    configure_zenml()
    ensure_stack()
    orchestrator = Client().active_stack.orchestrator
    if not orchestrator.config.is_schedulable:
        raise PipelineFailedError(
            f"the active stack's orchestrator {orchestrator.name!r} ({orchestrator.flavor}) does not run schedules; "
            "run `hilight retrain --if-new-data` from cron or a systemd timer (README: Scheduled retraining), or "
            "switch to a stack whose orchestrator supports schedules (e.g. Kubernetes, .zenml/remote_stack.yaml)")
    name, selection = "select_vision_weights", resolve_path(config.selection)
    module_name, config_ref = PIPELINES[name]
    pipeline = getattr(importlib.import_module(module_name), name)
    sel = load_config(selection, import_object(config_ref))
    return pipeline.with_options(schedule=Schedule(cron_expression=config.schedule.cron_expression),
                                 settings={"experiment_tracker.mlflow": {"experiment_name": sel.experiment_name}})(config=sel)
