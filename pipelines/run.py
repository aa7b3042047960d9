"""Run a pipeline by name with a typed YAML config on the project-local stack."""

from __future__ import annotations

import contextlib
import difflib
import importlib
import logging
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel

from hilight.config import ConfigError, InputError, import_object, load_config, read_yaml_mapping
from hilight.data.contracts import DataContract, load_contracts
from hilight.data.manifest import ManifestError, open_manifest
from hilight.env import resolve_path
from pipelines import PIPELINES
from pipelines.lock import take_retrain_lock
from pipelines.stack import code_cache_policy, configure_zenml, ensure_stack

log = logging.getLogger(__name__)


def run_pipeline(name: str, config_path: Path, *, enable_cache: bool | None = None, run_name: str | None = None,
                 overrides: Sequence[str] = ()):
    """Validate the config (with ``key.path=value`` ``overrides`` applied: the resolved config is what the steps
    receive, MLflow records and the run directories hash), make sure the stack exists, run the pipeline; returns the
    ZenML run."""
    if name not in PIPELINES:
        close = difflib.get_close_matches(name, PIPELINES, n=1)
        raise InputError(f"unknown pipeline {name!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                         + f" Known pipelines: {', '.join(PIPELINES)}")
    module_name, config_ref = PIPELINES[name]
    config = load_config(config_path, import_object(config_ref), overrides)
    if getattr(config, "pipeline", name) != name:
        raise ConfigError(f"{config_path} is a config for pipeline {config.pipeline!r}, not {name!r}; run "
                          f"`hilight run {config.pipeline} -c {config_path}`")
    check_inputs(config)  # before ZenML starts: a wrong path is a message, not a failed step
    configure_zenml()
    ensure_stack()
    pipeline = getattr(importlib.import_module(module_name), name)
    kwargs = {"config": config}
    if name == "data_validation":
        kwargs["contracts"] = {t: c.model_dump(mode="json") for t, c in contracts_of(config).items()}
    options = {
        "enable_cache": config.enable_cache if enable_cache is None else enable_cache,
        "cache_policy": code_cache_policy(),
        "settings": {"experiment_tracker.mlflow": {"experiment_name": getattr(config, "experiment_name", name)}},
    }
    if run_name:
        options["run_name"] = run_name
    if hasattr(config, "registry"):  # selection runs create a version of the ZenML model the registry model mirrors
        from zenml import Model

        options["model"] = Model(name=config.registry.model_name,
                                 description="HiLight VLM; versions come from select_vision_weights runs")
    try:
        with _one_failure_message():
            return pipeline.with_options(**options)(**kwargs)
    except RuntimeError as exc:
        raise PipelineFailedError(_failure_message(name, exc)) from exc


class _StepFailureRecords(logging.Filter):
    """Drops ZenML's records of a failed step: its step launcher and its orchestrator each log the step's exception
    before the run raises, and ``run_pipeline`` raises it once more with the step's message."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and record.name.startswith("zenml.orchestrators"))


@contextlib.contextmanager
def _one_failure_message():
    """While a pipeline runs from the CLI, its console shows a failed step's error once (in ``PipelineFailedError``);
    with ``-v`` (ZenML at INFO) ZenML's own records stay. Only the CLI's console handler (``hilight.logs``) is
    filtered: ZenML's step-log storage and other handlers keep every record."""
    if logging.getLogger("zenml").isEnabledFor(logging.INFO):
        yield
        return
    console = [h for h in logging.getLogger().handlers if getattr(h, "_hilight", False)]
    drop = _StepFailureRecords()
    for handler in console:
        handler.addFilter(drop)
    try:
        yield
    finally:
        for handler in console:
            handler.removeFilter(drop)


def contracts_of(config) -> dict[str, DataContract]:
    """The data contracts a data_validation config names (``contracts_dir``), or ``ConfigError`` saying why not."""
    return contracts_in(config.contracts_dir)


def contracts_in(contracts_dir: str) -> dict[str, DataContract]:
    """The data contracts in a config's ``contracts_dir`` value, or ``ConfigError`` saying why not."""
    directory = resolve_path(contracts_dir)
    if not directory.is_dir():
        raise ConfigError(f"contracts_dir: {directory} is not a directory; point contracts_dir at the folder of "
                          "contract YAMLs (the project's is data_contracts/)")
    try:
        return load_contracts(directory)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"contracts_dir: {exc}") from None


# weights and tokenizers a config reads (key path suffix -> what must be there), checked like ``init``
WEIGHT_PATHS = {
    "vision.clipvip": ("exists", "a CLIP-ViP export directory or an original-layout .pt"),
    "clipvip": ("exists", "a CLIP-ViP export directory or an original-layout .pt"),
    "vision.longclip": ("file", "the original longclip-B.pt"),
    "llm.dir": ("dir", "a local Gemma directory (config.json, safetensors, tokenizer files)"),
    "llm.tokenizer_dir": ("dir", "a directory of Gemma tokenizer files"),
    "tokenizer.dir": ("dir", "a local copy of openai/clip-vit-base-patch16's tokenizer files"),
    "evaluation.judge": ("model_dir", "an aligned CLIP-ViP export directory (model.safetensors and tokenizer/, as "
                                      "clipvip_alignment writes; a .pt is not enough: the judge needs its tokenizer)"),
}
_KINDS = {"exists": ("exist", Path.exists), "file": ("a file", Path.is_file), "dir": ("a directory", Path.is_dir),
          "model_dir": ("an export directory", lambda p: (p / "model.safetensors").is_file())}


def _weight_problem(where: str, value: str, label: str = "") -> str | None:
    """The problem with a weights/tokenizer path field, or None (fields WEIGHT_PATHS does not name: None);
    ``label`` is put before the key path in the message."""
    suffix = next((s for s in WEIGHT_PATHS if where == s or where.endswith("." + s)), None)
    if suffix is None:
        return None
    kind, what = WEIGHT_PATHS[suffix]
    word, ok = _KINDS[kind]
    path = resolve_path(value)
    if ok(path):
        return None
    found = "does not exist" if not path.exists() else f"is not {word}"
    return (f"  - {label}{where}: {path} {found}; point it at {what} (relative paths in a config are relative to "
            "the project root)")


def check_inputs(config: BaseModel) -> None:
    """Check the input paths a config names, before anything runs: every ``manifest_dir`` must hold a validated
    manifest, every ``init`` and every weights or tokenizer path (``WEIGHT_PATHS``) must exist as the kind it
    names, a ``contracts_dir`` must hold valid contracts; a selection's candidates are checked through their
    stage-1 configs (stage 2 reads the same towers and LLM). Raises one ``ConfigError`` listing every problem with
    its key path (paths inside a config are relative to the project root)."""
    problems = []
    fields = [("", *f) for f in _fields(config)]
    if hasattr(config, "candidate_configs"):  # select_vision_weights: what each candidate's stage 1 will read
        for name in config.candidates:
            stage1 = config.candidate_configs(name)[0]
            fields += [(f"candidates.{name} (stage 1: {config.stage1}) ", *f) for f in _fields(stage1)
                       if f[1] != "manifest_dir"]
    reported = set()  # a path named by the selection and again by each candidate's stage 1: said once
    for label, where, key, value in fields:
        if value is None:
            continue
        if isinstance(value, str) and (problem := _weight_problem(where, value, label)):
            if (key, value) not in reported:
                problems.append(problem)
            reported.add((key, value))
        elif key == "manifest_dir":
            try:
                open_manifest(value)
            except ManifestError as exc:
                problems.append(f"  - {where}: {exc}")
        elif key == "init" and isinstance(value, str) and not resolve_path(value).exists():
            problems.append(f"  - {label}{where}: {resolve_path(value)} does not exist (relative paths in a config are "
                            "relative to the project root); train or download it first, or fix the path")
        elif key == "contracts_dir":
            try:
                contracts_in(value)
            except ConfigError as exc:
                problems.append(f"  - {where}: {str(exc).removeprefix('contracts_dir: ')}")
    if problems:
        raise ConfigError(f"the config names {len(problems)} input(s) that cannot be used:\n" + "\n".join(problems))


def _fields(model: BaseModel, prefix: str = ""):
    """(key path, field name, value) of every field of ``model`` and of the models nested in it."""
    for name in type(model).model_fields:
        value = getattr(model, name)
        path = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            yield from _fields(value, path + ".")
        elif isinstance(value, dict) and all(isinstance(v, BaseModel) for v in value.values()):
            for key, item in value.items():  # e.g. a selection's candidates
                yield from _fields(item, f"{path}.{key}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    yield from _fields(item, f"{path}.{i}.")
        else:
            yield path, name, value


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


def run_retrain(config_path: Path, *, if_new_data: bool, lock_held: bool = False) -> dict:
    """``hilight retrain``: under a lock (taken here unless the caller holds it: ``pipelines.lock``), check the
    watched datasets against the champion; when new (or not ``if_new_data``), run data_validation → each training
    config → select_vision_weights. Returns what happened."""
    import mlflow

    from hilight.retrain import RetrainConfig, check_new_data, selection_model_name
    from pipelines.stack import mlflow_tracking_uri

    lock = None if lock_held else take_retrain_lock(config_path)
    try:
        config = load_config(config_path, RetrainConfig)
        configure_zenml()
        ensure_stack()
        mlflow.set_tracking_uri(mlflow_tracking_uri())
        check = check_new_data(config, selection_model_name(config))
        out = {"due": check.due, "reason": check.reason, "current": check.current, "recorded": check.recorded, "runs": []}
        if if_new_data and not check.due:
            return out
        out["runs"].append(run_pipeline("data_validation", resolve_path(config.data_validation)).name)
        for cfg in config.training:
            path = resolve_path(cfg)
            out["runs"].append(run_pipeline(str(read_yaml_mapping(path).get("pipeline")), path).name)
        selection = run_pipeline("select_vision_weights", resolve_path(config.selection))
        out["runs"].append(selection.name)
        out["decision"] = step_output(selection, "select_and_promote", "selection_decision")
        if (prune := config.prune_feature_cache) is not None:  # still under the lock: no other retrain reads it
            from hilight.data.feature_cache import prune_cache_dirs

            gone = prune_cache_dirs(resolve_path(prune.dir), keep=prune.keep, unused_days=prune.unused_days)
            out["pruned"] = [{"dir": str(c.path), "bytes": c.bytes} for c in gone]
        return out
    finally:
        if lock is not None:
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
                                 cache_policy=code_cache_policy(),
                                 settings={"experiment_tracker.mlflow": {"experiment_name": sel.experiment_name}})(config=sel)
