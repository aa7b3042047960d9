"""The ``hilight`` command line.

ZenML, MLflow and Great Expectations are imported inside the commands that need them, so
``hilight --help`` and ``hilight data synth`` start fast.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import click
import typer
import typer.core

from hilight.env import apply_offline_defaults, cli_path, project_root, resolve_path
from pipelines import PIPELINES



class _Commands(typer.core.TyperGroup):
    """Runs the commands; bad input (``hilight.config.InputError``: configs, paths, names, videos, manifests, and
    the model loaders' input errors) becomes one message and exit 2, the traceback only with ``-v``."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ValueError as exc:  # every input error is a ValueError; anything else is re-raised as it is
            if not isinstance(exc, _input_errors()):
                raise
            if ctx.params.get("verbose"):
                log.error("bad input", exc_info=exc)
            typer.secho(f"error: {exc}", fg="red", err=True)
            raise typer.Exit(2) from None


def _input_errors() -> tuple[type[ValueError], ...]:
    """The exception types that mean bad input. A loader's type counts only once its module is imported (it cannot
    have raised before), so ``hilight --help`` imports no torch."""
    from hilight.config import InputError

    loaders = {"hilight.models.checkpoints": "CheckpointError", "hilight.models.tokenizers": "TokenizerError",
               "hilight.eval.caption_scores": "EvalDataError"}
    return (InputError, *(getattr(sys.modules[m], name) for m, name in loaders.items() if m in sys.modules))


def _config_file(path: Path | None, default: Path | None = None) -> Path:
    """A ``-c`` path: relative to the working directory, as the shell means it (``hilight.env``: paths inside a
    config are relative to the project root); ``default`` (relative to the project root) when not given."""
    from hilight.config import ConfigError

    if path is None:
        return project_root() / default
    found = cli_path(path)
    if not found.exists():
        other = resolve_path(path)
        hint = (f"; did you mean {other}? (paths on the command line are relative to the working directory, "
                f"{Path.cwd()})" if other != found and other.is_file() else "")
        raise ConfigError(f"config file {found} does not exist{hint}")
    return found


app = typer.Typer(help="HiLight Pipelines: tracked, reproducible pipelines for the HiLight billiards video-language model.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False, cls=_Commands)
data_app = typer.Typer(help="Create and inspect datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
cache_app = typer.Typer(help="List and prune the frozen-tower feature cache (stages 1-2).", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
log = logging.getLogger("hilight")

DEMO_CONFIG = Path("configs/data_validation_demo.yaml")
DEMO_TRAINING = [("general pretraining", Path("configs/pretrain_general_demo.yaml")),
                 ("billiards alignment", Path("configs/alignment_demo.yaml"))]
DEMO_ABLATION = Path("configs/ablation_demo.yaml")
DEMO_LLM = Path("configs/llm_pretrain_demo.yaml")
DEMO_SELECTION = Path("configs/select_vision_weights_demo.yaml")
DEMO_RETRAIN = Path("configs/retrain_demo.yaml")
# Demo data: billiards clips with a fixed held-out set of the first DEMO_HELDOUT, and general-domain clips (80/10/10)
DEMO_BILLIARDS_CLIPS, DEMO_HELDOUT, DEMO_GENERAL_CLIPS = 600, 36, 200
# clips of split "eval": the set the ablation and the weight selection compare models on
DEMO_EVAL_CLIPS, DEMO_GENERAL_EVAL_CLIPS = 200, 100
CHAMPION_URI = "models:/hilight-vlm@champion"
# import ZenML: its logging is adopted (retrain adopts it itself, after taking its lock)
ZENML_COMMANDS = {"run", "demo", "ask", "ui", "stack", "serve"}
ASK_CACHE = Path("outputs/models")  # registered models downloaded by `hilight ask`
OVERRIDES = typer.Argument(None, metavar="[KEY.PATH=VALUE]...", show_default=False,
                           help="Config overrides, each parsed as YAML and validated with the file: train.lr=1e-4 "
                           "data.train_datasets=\\[billiards,general] data.sources.0.ratio=0.5")


@app.callback()
def _main(
    ctx: typer.Context,
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More detail: -v other libraries' INFO "
                                "records and the tracebacks of failed steps, -vv DEBUG."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings, errors and the command's result; no "
                               "progress bars."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars (without a terminal, bars print "
                                     "a line at most every 10 s)."),
) -> None:
    from hilight.logs import setup_logging

    apply_offline_defaults()
    setup_logging(-1 if quiet else verbose, progress="off" if no_progress else "auto")
    if ctx.invoked_subcommand in ZENML_COMMANDS:
        _adopt_zenml_logging()


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (created)."),
    videos: int = typer.Option(200, "--videos", "-n", min=1, help="Number of clips."),
    seed: int = typer.Option(0, "--seed", "-s", help="Random seed; same seed, same bytes."),
    domain: str = typer.Option("billiards", "--domain", "-d", help="billiards (pool table) or general (moving shapes)."),
    width: int = typer.Option(160, help="Frame width in pixels (even)."),
    height: int = typer.Option(96, help="Frame height in pixels (even)."),
    fps: int = typer.Option(10, help="Frames per second."),
    duration: float = typer.Option(3.0, help="Clip length in seconds."),
    workers: int = typer.Option(min(4, os.cpu_count() or 1), help="Worker processes."),
    heldout: Optional[int] = typer.Option(None, min=0, help="Make the first N clips the held-out ones (val/test "
                                          "alternately), the rest train (default: each clip draws 80/10/10)."),
    eval_clips: int = typer.Option(0, "--eval-clips", min=0, help="Also write N clips of split 'eval' (the same N "
                                   "whatever --videos), for comparisons no training run reads."),
) -> None:
    """Generate a synthetic dataset: MP4 clips, captions, hard negatives, QA and event logs."""
    from hilight.data.synth import SynthSettings, generate_dataset

    settings = SynthSettings(width=width, height=height, fps=fps, duration_s=duration)
    generate_dataset(out, domain=domain, n_videos=videos, seed=seed, settings=settings, workers=workers,
                     heldout=heldout, eval_clips=eval_clips)
    typer.echo(f"wrote {videos + eval_clips} {domain} clips to {out}")


@app.command("validate")
def validate(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="A data_validation config YAML (default: "
                                          f"the project's {DEMO_CONFIG})."),
    no_fail: bool = typer.Option(False, "--no-fail", help="Report but exit 0 when reject thresholds are exceeded (the "
                                 "run is still not made the current manifest)."),
    allow_rejects: bool = typer.Option(False, "--allow-rejects", help="Accept a dataset whose reject fraction exceeds a "
                                       "contract's threshold: its accepted rows become the current manifest (status "
                                       "accepted_with_rejects). A dataset with 0 accepted rows still fails."),
    rehash: bool = typer.Option(False, "--rehash", help="Read and hash every file again instead of trusting the "
                                "stat-keyed hash cache (after a content change with size and mtime restored by hand)."),
    overrides: Optional[list[str]] = OVERRIDES,
) -> None:
    """Validate data against the contracts without ZenML/MLflow (a quick local check).

    Writes the same manifest, quarantine, Great Expectations JSON and report as the
    data_validation pipeline, and prints the summary.
    """
    from hilight.config import load_config
    from hilight.data.ingest import DataRejectedError, DataValidationConfig, run_ingest
    from pipelines.run import contracts_of

    cfg = load_config(_config_file(config, DEMO_CONFIG), DataValidationConfig, overrides or ())
    if allow_rejects:
        cfg = cfg.model_copy(update={"allow_rejects": True})
    if rehash:
        from hilight.data.hashcache import request_rehash

        request_rehash()  # fingerprint and probe each read a file once
    contracts = contracts_of(cfg)
    try:
        result = run_ingest(cfg, contracts, check=not no_fail)
    except DataRejectedError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(1) from None
    typer.echo(result.summary.to_string(index=False))
    typer.echo(f"\nfingerprint {result.fingerprints['combined']}\nreport      {result.report_path}")
    typer.echo(f"status      {result.status}; current manifest {result.current or 'none (no run has passed)'}")


def _checked_config(path: Path, model, overrides):
    """The config at ``path`` and the inputs it names (manifests, ``init`` weights) checked before a job starts."""
    from hilight.config import load_config
    from pipelines.run import check_inputs

    cfg = load_config(path, model, overrides)
    check_inputs(cfg)
    return cfg


TRAINABLE = ("clipvip_alignment", "llm_pretrain", "tokenmining_pretrain", "lora_finetune")


def _stage(kind: str):
    """(config class, run function) of a stage ``hilight train`` runs, imported only when asked for."""
    if kind == "clipvip_alignment":
        from hilight.train.alignment import AlignmentConfig, run_alignment
        return AlignmentConfig, run_alignment
    if kind == "llm_pretrain":
        from hilight.train.text_lm import LLMPretrainConfig, run_llm_pretrain
        return LLMPretrainConfig, run_llm_pretrain
    if kind == "tokenmining_pretrain":
        from hilight.train.tokenmining import TokenMiningPretrainConfig, run_tokenmining_pretrain
        return TokenMiningPretrainConfig, run_tokenmining_pretrain
    from hilight.train.lora import LoRAFinetuneConfig, run_lora_finetune
    return LoRAFinetuneConfig, run_lora_finetune


def _outcome(kind: str, result) -> tuple[str, Path, dict[str, float]]:
    """(summary line, best model directory, held-out metrics as the pipelines log them) of a finished stage."""
    if kind == "clipvip_alignment":
        summary = "held-out text->video R@1: aligned {:.3f}, random init {:.3f}".format(
            result.retrieval["t2v_r1"], result.baseline["t2v_r1"])
        metrics = {**{f"heldout/{k}": v for k, v in result.retrieval.items()},
                   **{f"heldout_random_init/{k}": v for k, v in result.baseline.items()}}
        return summary, result.best_model, metrics
    if kind == "llm_pretrain":
        summary = f"held-out text loss {result.val_loss:.4f} (untrained {result.val_loss_init:.4f})"
        return summary, result.model_dir, {"heldout/lm_loss": result.val_loss,
                                           "heldout/lm_loss_untrained": result.val_loss_init}
    m = result.metrics
    metrics = {**{f"heldout/{k}": v for k, v in m.items()}, **{f"samples/{k}": v for k, v in result.samples.items()}}
    if kind == "tokenmining_pretrain":
        summary = (f"held-out answer loss {m['lm_loss']:.4f} (before training {m['lm_loss_initial']:.4f}, another "
                   f"clip's video {m['lm_loss_wrong_video']:.4f}, video tokens zeroed {m['lm_loss_zero_video']:.4f}, "
                   f"no video {m['lm_loss_no_video']:.4f})")
    else:
        summary = f"held-out answer loss {m['lm_loss']:.4f} (before stage 2 {m['lm_loss_initial']:.4f})"
    return summary, result.best_dir, metrics


def _training_tracker(kind: str, cfg, track: bool):
    """The MLflow run of ``hilight train --track`` (a null context without ``--track``, and on every process of an
    ``accelerate launch`` but the main one, so N processes make one run)."""
    import contextlib

    if not track or int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext(None)
    from hilight.data.manifest import open_manifest
    from hilight.tracking import tracked_training

    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        from pipelines.stack import configure_zenml, ensure_stack, mlflow_tracking_uri

        configure_zenml()
        ensure_stack()
        uri = mlflow_tracking_uri()
    fingerprint = open_manifest(cfg.data.manifest_dir)[1].get("data_fingerprint")
    launch = {"hilight.launcher": "hilight train", "hilight.stage": kind,
              "hilight.processes": os.environ.get("WORLD_SIZE", "1"),
              "hilight.deepspeed": str(os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true").lower(),
              "hilight.mixed_precision": cfg.train.mixed_precision}
    return tracked_training(uri, kind, cfg, fingerprint=fingerprint, tags=launch)


@app.command("train")
def train(
    config: Path = typer.Option(..., "--config", "-c", help="A clipvip_alignment, llm_pretrain, tokenmining_pretrain or "
                                "lora_finetune config YAML."),
    overrides: Optional[list[str]] = OVERRIDES,
    track: bool = typer.Option(False, "--track", help="Record the run in MLflow (the project stack's store, or "
                               "MLFLOW_TRACKING_URI): lineage, config, per-step metrics, held-out results and the "
                               "exported model, in the experiment named after the stage. Under `accelerate launch` "
                               "the main process records one run for all processes."),
) -> None:
    """Train one stage without ZenML (quick local iteration, or under `accelerate launch` on several GPUs).
    Re-running the same command resumes from the last checkpoint. Untracked unless `--track`; `hilight run <pipeline>
    -c ...` is the pipeline equivalent, with data location and caching."""
    from hilight.config import read_yaml_mapping

    path = _config_file(config)
    kind = read_yaml_mapping(path).get("pipeline", "clipvip_alignment")
    if kind not in TRAINABLE:
        typer.secho(f"{config}: `hilight train` runs {', '.join(TRAINABLE)} configs, not {kind!r}; use "
                    f"`hilight run {kind} -c {config}`", fg="red", err=True)
        raise typer.Exit(2)
    config_class, run_stage = _stage(kind)
    cfg = _checked_config(path, config_class, overrides or [])
    with _training_tracker(kind, cfg, track) as tracker:
        result = run_stage(cfg, tracker=tracker)
        summary, best, metrics = _outcome(kind, result)
        if tracker is not None:
            from hilight.tracking import log_training_outcome

            log_training_outcome(result.fit, run_dir=result.run_dir, best_dir=best, artifact_path="model/best",
                                 table_dir="training", metrics=metrics, rejected=getattr(result, "rejected", None))
    fit = result.fit
    resumed = "fresh start" if fit.resumed_from is None else f"resumed from step {fit.resumed_from}"
    typer.echo(f"trained {fit.step} steps ({resumed}; {fit.skipped_steps} skipped) in {result.run_dir}")
    typer.echo(f"best model      {best}")
    typer.echo(summary)


@app.command("run", help="Run a ZenML pipeline on the project-local stack, tracked in MLflow.\n\nPipelines: "
             + ", ".join(PIPELINES) + ".\n\nExample: hilight run clipvip_alignment -c configs/alignment_demo.yaml "
             "train.lr=1e-4 train.max_steps=50")
def run(
    pipeline: str = typer.Argument(..., help="Pipeline name: " + ", ".join(PIPELINES) + "."),
    config: Path = typer.Option(..., "--config", "-c", help="Config YAML for that pipeline."),
    overrides: Optional[list[str]] = OVERRIDES,
    no_cache: bool = typer.Option(False, "--no-cache", help="Re-run every step even if cached."),
    run_name: Optional[str] = typer.Option(None, help="ZenML run name (default: generated)."),
) -> None:
    """Run a ZenML pipeline on the project-local stack, tracked in MLflow (help text: the decorator's, which lists
    the pipelines)."""
    from pipelines.run import PipelineFailedError, run_pipeline

    try:
        result = run_pipeline(pipeline, _config_file(config), enable_cache=False if no_cache else None, run_name=run_name,
                              overrides=overrides or ())
    except PipelineFailedError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"pipeline {pipeline} finished: run {getattr(result, 'name', result)}")
    if pipeline == "data_validation":
        _print_validation_summary(_config_file(config), overrides or ())


def _print_validation_summary(config: Path, overrides: list[str]) -> None:
    """Accepted / rejected counts per table and where the report is, from the manifest the run wrote."""
    from hilight.config import load_config
    from hilight.data.ingest import DataValidationConfig

    manifest_dir = resolve_path(load_config(config, DataValidationConfig, overrides).output_dir)
    counts = json.loads((manifest_dir / "manifest.json").read_text())["counts"]
    tables = dict.fromkeys(k.rsplit("_", 1)[0] for k in counts)
    typer.echo("accepted / rejected   " + ", ".join(f"{t} {counts.get(f'{t}_accepted', 0)} / "
                                                    f"{counts.get(f'{t}_rejected', 0)}" for t in tables))
    typer.echo(f"report                {manifest_dir / 'report.md'}")


@app.command("demo")
def demo(
    videos: int = typer.Option(DEMO_BILLIARDS_CLIPS, "--videos", "-n", min=2, help="Billiards clips."),
    heldout: int = typer.Option(DEMO_HELDOUT, min=1, help="Billiards clips held out for evaluation (the first N; a "
                                "fixed set, so more training clips do not change what the held-out numbers measure)."),
    general_videos: int = typer.Option(DEMO_GENERAL_CLIPS, "--general-videos", min=10, help="General-domain clips."),
    eval_clips: int = typer.Option(DEMO_EVAL_CLIPS, "--eval-clips", min=1, help="Billiards clips of split 'eval' "
                                   "(besides --videos) on which the ablation and the weight selection compare models; "
                                   f"no training run reads them (the selection also gets {DEMO_GENERAL_EVAL_CLIPS} "
                                   "general-domain ones)."),
    seed: int = typer.Option(0, help="Data seed."),
    workers: int = typer.Option(min(4, os.cpu_count() or 1), help="Worker processes for synthesis."),
) -> None:
    """Synthetic billiards + general data → validation → general pretraining ("original") → billiards alignment
    ("table1k") → ablation of the four local-loss placements → the demo LLM → weight selection (per candidate: stage 1,
    stage 2, merge, evaluation; then the champion in the MLflow registry), each a tracked ZenML pipeline run."""
    import time

    from hilight.data.synth import GENERATOR_VERSION, generate_dataset

    started = time.monotonic()
    timings: dict[str, float] = {}  # seconds per part, in order: where the demo's time goes

    def timed(part: str, run, *args, **kwargs):
        t0 = time.monotonic()
        out = run(*args, **kwargs)
        timings[part] = round(time.monotonic() - t0, 1)
        return out

    root = project_root()
    for domain, n, held, n_eval in (("billiards", videos, heldout, eval_clips),
                                    ("general", general_videos, None, DEMO_GENERAL_EVAL_CLIPS)):
        out = root / "data" / "synth" / domain
        meta = out / "dataset.json"
        current = json.loads(meta.read_text()) if meta.is_file() else {}
        wanted = {"n_videos": n, "heldout": held, "eval_clips": n_eval, "seed": seed, "version": GENERATOR_VERSION}
        if {k: current.get(k) for k in wanted} == wanted:
            typer.echo(f"{domain}: reusing {out}")
            continue
        timed(f"synthesis ({domain})", generate_dataset, out, domain=domain, n_videos=n, seed=seed, workers=workers,
              heldout=held, eval_clips=n_eval)

    import pandas as pd

    from hilight.config import load_config
    from hilight.experiments.selection import SelectionConfig
    from pipelines.run import PipelineFailedError, run_pipeline, step_output
    from pipelines.stack import mlflow_tracking_uri

    try:
        result = timed("data validation", run_pipeline, "data_validation", root / DEMO_CONFIG)
        trained = {}
        for label, cfg in DEMO_TRAINING:
            run = timed(label, run_pipeline, "clipvip_alignment", root / cfg)
            trained[label] = (run.name, step_output(run, "train_clipvip", "heldout_retrieval"))
        ablation = timed("ablation", run_pipeline, "alignment_ablation", root / DEMO_ABLATION)
        comparison = step_output(ablation, "compare_variants", "ablation_comparison")
        selection = step_output(ablation, "compare_variants", "ablation_selection")
        llm_run = timed("demo LLM", run_pipeline, "llm_pretrain", root / DEMO_LLM)
        llm_loss = step_output(llm_run, "pretrain_llm", "llm_heldout_loss")
        selection_run = timed("selection", run_pipeline, "select_vision_weights", root / DEMO_SELECTION)
        decision = step_output(selection_run, "select_and_promote", "selection_decision")
        evidence = step_output(selection_run, "select_and_promote", "selection_evidence")
        selection_config = load_config(root / DEMO_SELECTION, SelectionConfig)
        owner = selection_config.stage1_owner  # whose stage-1 run each one uses
        stage1 = {r["candidate"]: step_output(selection_run, f"stage1_{owner(r['candidate'])}", "stage1_heldout")
                  for r in decision["ranking"]}  # the new candidates (the evidence also lists the incumbent)
        per_seed: dict[str, list[pd.DataFrame]] = {}  # per candidate, its seeds' answers as the decision pooled them
        for name, seed in selection_config.runs():
            a = step_output(selection_run, f"evaluate_{selection_config.run_key(name, seed)}", "vlm_answers")
            per_seed.setdefault(name, []).append(a if seed is None else a.assign(seed=seed))
        answers = {name: pd.concat(tables) for name, tables in per_seed.items()}
        if decision.get("incumbent"):
            answers[decision["incumbent"]["label"]] = step_output(selection_run, "evaluate_incumbent", "incumbent_answers")
    except PipelineFailedError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(1) from None

    from hilight.experiments.demo_summary import ablation_summary, render_demo_summary, selection_summary

    manifest = json.loads((root / "outputs" / "data_validation" / "manifest.json").read_text())
    runs = {label: {"run": name, "t2v_r1": m["t2v_r1"], "random_t2v_r1": m["random_init/t2v_r1"],
                    "t2v_median_rank": m["t2v_median_rank"], "random_t2v_median_rank": m["random_init/t2v_median_rank"]}
            for label, (name, m) in trained.items()}
    exe = Path(sys.argv[0]).resolve()
    command = exe.relative_to(root) if exe.is_relative_to(root) else "hilight"
    path = root / "outputs" / "demo_summary.json"
    summary = {
        "seconds": round(time.monotonic() - started, 1), "timings": timings, "path": str(path),
        "data": {"run": result.name, "fingerprint": manifest["data_fingerprint"], "counts": manifest["counts"],
                 "manifest": str(root / "outputs/data_validation"), "report": str(root / "outputs/data_validation/report.md")},
        "alignment": {"billiards_t2v_r1": runs["billiards alignment"]["t2v_r1"],
                      "billiards_t2v_r1_random": runs["billiards alignment"]["random_t2v_r1"], "runs": runs,
                      "models": f"{root / 'outputs/pretrain_general/best'}  (\"original\"),  "
                                f"{root / 'outputs/alignment/best'}  (\"table1k\")"},
        "ablation": ablation_summary(ablation.name, comparison, selection, str(root / "outputs/ablation/report"),
                                     pd.read_parquet(root / "outputs/ablation/report/caption_scores.parquet")),
        "llm": {"run": llm_run.name, "lm_loss": llm_loss["lm_loss"], "lm_loss_untrained": llm_loss["lm_loss_untrained"],
                "model": str(root / "outputs/llm_pretrain/model")},
        "selection": {**selection_summary(selection_run.name, decision, evidence, stage1, str(root / "outputs/selection"),
                                          answers),
                      "report": str(root / "outputs/selection/decision/decision.md")},
        "mlflow": {"store": mlflow_tracking_uri(),
                   "ui": "hilight ui   (then open http://127.0.0.1:5000: experiments 'select_vision_weights', "
                         "'clipvip_alignment', 'alignment_ablation', 'llm_pretrain', 'data_validation'; Models -> hilight-vlm)"},
        "ask": f"{command} ask {_held_out_video(root)} \"What's happened in this video?\"",
    }
    path.write_text(json.dumps(summary, indent=1, default=str))
    typer.echo("\n" + render_demo_summary(json.loads(path.read_text())))


def _held_out_video(root: Path) -> Path:
    """A held-out billiards clip of the demo data, for the printed `hilight ask` example."""
    rows = json.loads((root / "data/synth/billiards/captions.json").read_text())
    clip = next(r for r in rows if r["split"] == "test")
    return (root / "data/synth/billiards/videos" / clip["video"]).relative_to(root)


@app.command("retrain")
def retrain(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="A retrain config YAML (default: the project's "
                                          f"{DEMO_RETRAIN})."),
    if_new_data: bool = typer.Option(False, "--if-new-data", help="Only retrain when a watched dataset changed."),
    schedule: bool = typer.Option(False, "--schedule", help="Register the selection pipeline with the config's cron "
                                  "schedule on the active stack (orchestrators that run schedules only)."),
    rehash: bool = typer.Option(False, "--rehash", help="Read and hash every file again (the check and the validation "
                                "it runs) instead of trusting the stat-keyed hash cache; same as HILIGHT_REHASH=1."),
) -> None:
    """Retrain when new data arrives: fingerprint the watched datasets, compare with the champion's, and run
    validation → training → selection when they differ. Exit 0: done or nothing to do; 1: a run failed;
    75: another retrain holds the lock."""
    from pipelines.lock import RetrainLockedError, take_retrain_lock

    path = _config_file(config, DEMO_RETRAIN)
    if not schedule:
        try:  # before the heavy imports below, so a second retrain exits 75 at once
            lock = take_retrain_lock(path)
        except RetrainLockedError as exc:
            typer.secho(str(exc), fg="yellow", err=True)
            raise typer.Exit(75) from None

    from hilight.data.hashcache import request_rehash
    from pipelines.run import PipelineFailedError, run_retrain, schedule_selection

    _adopt_zenml_logging()

    if rehash:  # through the environment: it reaches every step of the pipelines this command runs in-process
        request_rehash()
    try:
        if schedule:
            schedule_selection(path)
            typer.echo(f"scheduled select_vision_weights on the active stack ({path})")
            return
        out = run_retrain(path, if_new_data=if_new_data, lock_held=True)
    except PipelineFailedError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(1) from None
    finally:
        if not schedule:
            lock.release()
    if not out["runs"]:
        typer.echo(f"no retrain: {out['reason']}")
        return
    d = out["decision"]
    typer.echo(f"retrained ({out['reason']}): runs {', '.join(out['runs'])}")
    typer.echo(f"champion {d['registry']['champion_uri']} = version {d['registry']['champion']} ({d['champion']}); "
               f"{d['status']}: {d['explanation']}")
    if "pruned" in out:
        typer.echo(f"feature cache: deleted {len(out['pruned'])} old directories "
                   f"({sum(p['bytes'] for p in out['pruned']) / 2**30:.2f} GiB)")


@app.command("ask")
def ask(
    video: Path = typer.Argument(..., help="A video file."),
    question: str = typer.Argument(..., help="The question, e.g. \"What's happened in this video?\""),
    model: str = typer.Option(CHAMPION_URI, "--model", "-m",
                              help="A registered model URI (models:/name@alias, models:/name/N) or a merged model dir."),
    temperature: Optional[float] = typer.Option(None, help="Sampling temperature (default: the model's, 0.1)."),
    max_new_tokens: Optional[int] = typer.Option(None, min=1, help="Answer length limit (default: the model's, 128)."),
    device: Optional[str] = typer.Option(None, help="Where the model runs: cuda, cuda:1, cpu (default: cuda when "
                                                    "available, else cpu)."),
) -> None:
    """Answer a question about a video with a HiLight model, streaming the tokens as they are generated; the
    prompt uses the training chat template. The video is checked with the validation rules (data_contracts/
    video_files.yaml) and the prompt against the model's context before the model is loaded."""
    import threading

    from hilight.config import InputError
    from hilight.data.videocheck import check_video

    video = cli_path(video)
    check_video(video, project_root() / "data_contracts")  # seconds, where loading the model takes many more
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    local = cli_path(model) if not model.startswith(("models:/", "runs:/")) else None
    if local is None:
        import mlflow

        from hilight.registry import local_model_dir
        from pipelines.stack import configure_zenml, ensure_stack, mlflow_tracking_uri

        configure_zenml()
        ensure_stack()
        mlflow.set_tracking_uri(mlflow_tracking_uri())
        try:
            local = local_model_dir(model, project_root() / ASK_CACHE)
        except mlflow.exceptions.MlflowException as exc:
            typer.secho(f"cannot resolve {model}: {exc.message}\nrun `make demo` (or `hilight run select_vision_weights "
                        "-c ...`) to register a champion, or pass --model <merged model dir>", fg="red", err=True)
            raise typer.Exit(1) from None
    elif not (local / "hilight.json").is_file():
        what = "does not exist" if not local.exists() else "is not a HiLight model directory (no hilight.json)"
        raise InputError(f"--model {model}: {local} {what}; pass a merged model directory (e.g. "
                         f"outputs/selection/<candidate>/merged) or a registered model URI such as {CHAMPION_URI}")
    meta = json.loads((local / "hilight.json").read_text())
    limit = max_new_tokens or meta["generation"]["max_new_tokens"]
    _check_prompt_length(local, question, video_tokens=meta["video_tokens"], max_new_tokens=limit)

    from transformers import TextIteratorStreamer
    from transformers.utils import logging as transformers_logging

    from hilight.models.export import load_vlm_dir

    transformers_logging.disable_progress_bar()
    bundle = load_vlm_dir(local, device=device)
    updates = {k: v for k, v in (("temperature", temperature), ("max_new_tokens", max_new_tokens)) if v is not None}
    generation = bundle.generation.model_copy(update=updates)
    streamer = TextIteratorStreamer(bundle.tokenizer, skip_special_tokens=True)
    clip = bundle.clip(video)[None]  # decoded at most at 4x the model's frame size (hilight.data.frames)
    failed: list[BaseException] = []

    def generate() -> None:
        try:
            bundle.generate([question], pixel_values=clip, generation=generation, streamer=streamer)
        except BaseException as exc:  # re-raised below; ending the stream keeps the reader from waiting forever
            failed.append(exc)
            streamer.end()

    worker = threading.Thread(target=generate)
    worker.start()
    for piece in streamer:
        typer.echo(piece, nl=False)
    worker.join()
    if failed:
        raise failed[0]
    typer.echo("")


def _check_prompt_length(model_dir: Path, question: str, *, video_tokens: int, max_new_tokens: int) -> None:
    """Refuse a question whose prompt (chat template + video tokens) and answer do not fit the LLM's context, with
    the token counts; only the tokenizer and ``llm/config.json`` are read."""
    from hilight.config import InputError
    from hilight.data.conversations import encode_prompt
    from hilight.models.tokenizers import load_llm_tokenizer

    context = json.loads((model_dir / "llm" / "config.json").read_text())["max_position_embeddings"]
    tokenizer = load_llm_tokenizer(model_dir / "llm")
    prompt = len(encode_prompt(question, tokenizer, video_tokens=video_tokens).input_ids)
    if prompt + max_new_tokens > context:
        question_tokens = len(tokenizer(question, add_special_tokens=False)["input_ids"])
        room = context - max_new_tokens - (prompt - question_tokens)
        raise InputError(f"the question is {question_tokens} tokens; with the chat template and {video_tokens} video "
                         f"tokens the prompt is {prompt} tokens, and with up to {max_new_tokens} answer tokens that "
                         f"exceeds the model's context of {context} tokens. Shorten the question to at most "
                         f"{max(room, 0)} tokens, or lower --max-new-tokens")


@app.command("estimate")
def estimate_cmd(
    config: Path = typer.Option(..., "--config", "-c", help="A clipvip_alignment, tokenmining_pretrain or lora_finetune "
                                "config YAML."),
    overrides: Optional[list[str]] = OVERRIDES,
    gpu: str = typer.Option("h100", help="GPU kind: h100, h200, a100, a100-40gb, l40s, rtx4090 (its dense bf16 peak)."),
    gpus: int = typer.Option(1, min=1, help="GPUs in the job (data parallel)."),
    mfu: Optional[float] = typer.Option(None, min=0.01, max=1.0, help="Model FLOPs utilisation (default: the stage's "
                                        "measured value in benchmarks/results/gpu.json, else 0.4)."),
    samples: Optional[int] = typer.Option(None, min=1, help="Training samples per epoch (default: counted in the "
                                          "config's validated manifest)."),
    text_tokens: Optional[int] = typer.Option(None, min=2, help="Text tokens per sample beside the video tokens "
                                              "(stages 1-2; default 128 / 256)."),
    llm_preset: Optional[str] = typer.Option(None, help="Gemma preset when llm.dir has no config.json (default: the "
                                             "preset its name contains, e.g. gemma-2b)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of the table."),
) -> None:
    """What a training run costs before it starts: model FLOPs per sample (counted with torch's FlopCounterMode on
    the real architecture built on the meta device; no weights are read), parameters, memory per GPU, and projected
    hours per epoch and for the configured run, with the notes' 6TP/(nXu) beside it."""
    import yaml

    from hilight.config import import_object, load_config
    from hilight.estimate import STAGES, estimate, format_table

    path = cli_path(config)
    if not path.is_file():
        typer.secho(f"config {config} does not exist (resolved to {path}; paths on the command line are relative to "
                    "the working directory)", fg="red", err=True)
        raise typer.Exit(2)
    kind = (yaml.safe_load(path.read_text()) or {}).get("pipeline")
    if kind not in STAGES:
        typer.secho(f"{config}: `hilight estimate` takes {', '.join(STAGES)} configs, not {kind!r}", fg="red", err=True)
        raise typer.Exit(2)
    cfg = load_config(path, import_object(PIPELINES[kind][1]), overrides or ())
    try:
        result = estimate(cfg, str(config), gpu=gpu, gpus=gpus, mfu=mfu, samples=samples, text_tokens=text_tokens,
                          llm_preset=llm_preset)
    except ValueError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(result.to_json(), indent=1) if as_json else format_table(result))


@app.command("serve")
def serve(
    model: str = typer.Option(CHAMPION_URI, "--model", "-m", help="A registered model URI (models:/name@alias, "
                              "models:/name/N) or runs:/ URI."),
    port: int = typer.Option(5001, help="Port to listen on."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind (default: local only; the server has no "
                             "authentication)."),
    workers: int = typer.Option(1, min=1, help="Server processes (each loads the model)."),
    timeout: int = typer.Option(300, min=1, help="Seconds one request may take (generation on CPU is slow)."),
) -> None:
    """Serve a HiLight model over HTTP with MLflow's scoring server (`mlflow models serve`, local environment):
    POST /invocations with {"dataframe_records": [{"video": PATH, "question": TEXT}]} answers
    {"predictions": [...]}; a video the server cannot read is a 400 with the reason; GET /ping says when it is ready."""
    from pipelines.stack import configure_zenml, ensure_stack, mlflow_tracking_uri

    configure_zenml()
    ensure_stack()
    uri = mlflow_tracking_uri()
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model, "--env-manager", "local", "-h", host,
           "-p", str(port), "-w", str(workers), "-t", str(timeout)]
    typer.echo(f"serving {model} on http://{host}:{port}  (store {uri}); ask with\n  curl -s http://{host}:{port}"
               "/invocations -H 'Content-Type: application/json' -d '{\"dataframe_records\": [{\"video\": "
               "\"/abs/path/clip.mp4\", \"question\": \"What is happening in this video?\"}]}'")
    sys.stdout.flush()
    # MLflow starts `uvicorn` by name: this environment's bin first, also when the venv is not activated
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    # the server replaces this process, so stopping `hilight serve` stops the server
    os.execve(sys.executable, cmd, {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri, "PATH": path})


@app.command("ui")
def ui(
    port: int = typer.Option(5000, help="Port to listen on."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind (default: local only)."),
) -> None:
    """Start the MLflow UI on the project's tracking store (Ctrl-C or SIGTERM stops it and its workers)."""
    import signal
    import socket
    import time

    from hilight.config import InputError

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:  # mlflow's server exits 0 after "Address already in use"; ask the OS first
            probe.bind((host, port))
        except OSError as exc:
            raise InputError(f"cannot listen on {host}:{port}: {exc.strerror} (another `hilight ui` or MLflow "
                             f"server?); stop it or pass --port <free port>") from None

    from pipelines.stack import configure_zenml, ensure_stack, mlflow_tracking_uri

    configure_zenml()
    ensure_stack()
    uri = mlflow_tracking_uri()
    if uri.startswith(("http://", "https://", "databricks")):  # a server's URI is no backend store to serve
        typer.echo(f"the tracking store is the MLflow server {uri}: its UI is already there (nothing started)")
        return
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    if uri.startswith("sqlite:///"):
        artifacts = Path(uri[len("sqlite:///"):]).parent / "mlflow_artifacts"
        cmd += ["--default-artifact-root", artifacts.as_uri()]
    typer.echo(f"MLflow UI on http://{host}:{port}  (store {uri})")
    # its own process group: the server's workers are its children, and a signal to the group reaches them all
    server = subprocess.Popen(cmd, start_new_session=True)
    stopping: list[int] = []

    def forward(signum: int, _frame) -> None:
        stopping.append(signum)
        try:
            os.killpg(server.pid, signum)
        except ProcessLookupError:  # already gone
            pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        deadline = None
        while (code := server.poll()) is None:
            if stopping and deadline is None:
                deadline = time.monotonic() + 10
            if deadline is not None and time.monotonic() > deadline:  # it ignores the signal: end the group
                os.killpg(server.pid, signal.SIGKILL)
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopping:
        try:  # workers that outlived the server would keep the port
            os.killpg(server.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        raise typer.Exit(0)
    if code != 0:
        typer.secho(f"the MLflow server exited with status {code}", fg="red", err=True)
    raise typer.Exit(code)


CACHE_DIR = typer.Option(None, "--dir", help="The cache root, as the stage configs' `features.dir` names it "
                         "(default: outputs/feature_cache under the project root).")


def _cache_root(cache_dir: Path | None) -> Path:
    return resolve_path("outputs/feature_cache") if cache_dir is None else cli_path(cache_dir)


def _cache_rows(dirs) -> str:
    import time

    lines = [f"{'directory':<16}  {'last used':<16}  {'shards':>6}  {'size':>10}  clipvip       longclip"]
    for c in dirs:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(c.last_used))
        lines.append(f"{c.digest:<16}  {used:<16}  {c.shards:>6}  {c.bytes / 2**20:>7.1f} MiB  "
                     f"{str(c.key.get('clipvip', '?'))[:12]:<12}  {str(c.key.get('longclip', '?'))[:12]}")
    return "\n".join(lines)


@cache_app.command("list")
def cache_list(cache_dir: Optional[Path] = CACHE_DIR) -> None:
    """The cache's directories (one per tower weights, settings, code and library versions), most recently used
    first."""
    from hilight.data.feature_cache import cache_dirs

    root = _cache_root(cache_dir)
    dirs = cache_dirs(root)
    if not dirs:
        typer.echo(f"no feature-cache directories under {root}")
        return
    typer.echo(_cache_rows(dirs))
    typer.echo(f"{len(dirs)} directories, {sum(c.bytes for c in dirs) / 2**30:.2f} GiB under {root}")


@cache_app.command("prune")
def cache_prune(
    keep: Optional[int] = typer.Option(None, "--keep", min=0, help="Keep the N most recently used directories."),
    unused_days: Optional[float] = typer.Option(None, "--unused-days", min=0,
                                                help="Delete only directories no run opened for D days."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would go; delete nothing."),
    cache_dir: Optional[Path] = CACHE_DIR,
) -> None:
    """Delete old feature-cache directories (each retrain with new vision weights adds one; at Valley-703K scale
    each is terabytes). Run it when no training job is reading the cache."""
    from hilight.config import InputError
    from hilight.data.feature_cache import prune_cache_dirs

    root = _cache_root(cache_dir)
    if keep is None and unused_days is None:
        raise InputError("say what to keep: --keep N (the N most recently used directories) and/or --unused-days D")
    gone = prune_cache_dirs(root, keep=keep, unused_days=unused_days, dry_run=dry_run)
    if not gone:
        typer.echo(f"nothing to delete under {root}")
        return
    typer.echo(_cache_rows(gone))
    verb = "would delete" if dry_run else "deleted"
    typer.echo(f"{verb} {len(gone)} directories, {sum(c.bytes for c in gone) / 2**30:.2f} GiB, under {root}")


@app.command("stack")
def stack() -> None:
    """Create (idempotently) and show the project-local ZenML stack."""
    from pipelines.stack import ensure_stack, mlflow_tracking_uri

    name = ensure_stack()
    typer.echo(f"ZenML config  {os.environ['ZENML_CONFIG_PATH']}\nactive stack  {name}\nMLflow store  {mlflow_tracking_uri()}")


def _hide_flag_placeholders() -> None:
    """Typer 0.29's help prints a value placeholder after boolean flags (``--no-cache <bool>``), which take no value;
    show none for flags, keep the others' (``<path>``, ``<int>``)."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich
    if getattr(shown, "_hilight", False):
        return

    def display_type_rich(self: TyperOption, ctx) -> str | None:
        return None if self.is_flag and self.metavar is None else shown(self, ctx)

    display_type_rich._hilight = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich


def _adopt_zenml_logging() -> None:
    """Import ZenML and keep the project's single console handler (see ``hilight.logs.adopt_console``)."""
    from zenml.logger import ZenMLConsoleHandler

    from hilight.logs import adopt_console

    adopt_console(ZenMLConsoleHandler)


def main() -> None:
    """Console entry point: a bad config is its message (every problem, with key paths) and exit code 2, not a
    traceback."""
    from hilight.config import ConfigError

    _hide_flag_placeholders()
    try:
        app()
    except ConfigError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
