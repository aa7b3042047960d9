"""Run a pipeline by name with a typed YAML config on the project-local stack."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from hilight.config import import_object, load_config
from hilight.data.contracts import load_contracts
from hilight.env import resolve_path
from pipelines import PIPELINES
from pipelines.stack import configure_zenml, ensure_stack

log = logging.getLogger(__name__)


def run_pipeline(name: str, config_path: Path, *, enable_cache: bool | None = None, run_name: str | None = None):
    """Validate the config, make sure the stack exists, run the pipeline; returns the ZenML run."""
    if name not in PIPELINES:
        raise KeyError(f"unknown pipeline {name!r}; choose one of {sorted(PIPELINES)}")
    module_name, config_ref = PIPELINES[name]
    config = load_config(config_path, import_object(config_ref))
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
