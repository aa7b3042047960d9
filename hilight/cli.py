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

import typer

from hilight.env import apply_offline_defaults, project_root, resolve_path

app = typer.Typer(help="HiLight Pipelines: tracked, reproducible pipelines for the HiLight billiards video-language model.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Create and inspect datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
log = logging.getLogger("hilight")

DEMO_CONFIG = Path("configs/data_validation_demo.yaml")
DEMO_TRAINING = [("general pretraining", Path("configs/pretrain_general_demo.yaml")),
                 ("billiards alignment", Path("configs/alignment_demo.yaml"))]
DEMO_ABLATION = Path("configs/ablation_demo.yaml")
DEMO_LLM = Path("configs/llm_pretrain_demo.yaml")
DEMO_STAGE1 = Path("configs/tokenmining_demo.yaml")


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    apply_offline_defaults()
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("great_expectations", "alembic", "urllib3", "mlflow", "zenml"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


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
) -> None:
    """Generate a synthetic dataset: MP4 clips, captions, hard negatives, QA and event logs."""
    from hilight.data.synth import SynthSettings, generate_dataset

    settings = SynthSettings(width=width, height=height, fps=fps, duration_s=duration)
    generate_dataset(out, domain=domain, n_videos=videos, seed=seed, settings=settings, workers=workers)
    typer.echo(f"wrote {videos} {domain} clips to {out}")


@app.command("validate")
def validate(
    config: Path = typer.Option(DEMO_CONFIG, "--config", "-c", help="A data_validation config YAML."),
    no_fail: bool = typer.Option(False, "--no-fail", help="Report but exit 0 when reject thresholds are exceeded."),
) -> None:
    """Validate data against the contracts without ZenML/MLflow (a quick local check).

    Writes the same manifest, quarantine, Great Expectations JSON and report as the
    data_validation pipeline, and prints the summary.
    """
    from hilight.config import load_config
    from hilight.data.contracts import load_contracts
    from hilight.data.ingest import DataRejectedError, DataValidationConfig, run_ingest

    cfg = load_config(resolve_path(config), DataValidationConfig)
    contracts = load_contracts(resolve_path(cfg.contracts_dir))
    try:
        result = run_ingest(cfg, contracts, check=not no_fail)
    except DataRejectedError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(1) from None
    typer.echo(result.summary.to_string(index=False))
    typer.echo(f"\nfingerprint {result.fingerprints['combined']}\nreport      {result.report_path}")


@app.command("train")
def train(
    config: Path = typer.Option(..., "--config", "-c", help="A clipvip_alignment, llm_pretrain or tokenmining_pretrain config YAML."),
) -> None:
    """Train without ZenML/MLflow (quick local iteration, or under `accelerate launch`). Re-running the same command
    resumes from the last checkpoint; `hilight run <pipeline> -c ...` is the tracked equivalent."""
    import yaml

    from hilight.config import load_config

    path = resolve_path(config)
    kind = (yaml.safe_load(path.read_text()) or {}).get("pipeline", "clipvip_alignment")
    if kind == "clipvip_alignment":
        from hilight.train.alignment import AlignmentConfig, run_alignment

        result = run_alignment(load_config(path, AlignmentConfig))
        summary = "held-out text->video R@1: aligned {:.3f}, random init {:.3f}".format(
            result.retrieval["t2v_r1"], result.baseline["t2v_r1"])
        best = result.best_model
    elif kind == "llm_pretrain":
        from hilight.train.text_lm import LLMPretrainConfig, run_llm_pretrain

        result = run_llm_pretrain(load_config(path, LLMPretrainConfig))
        summary = f"held-out text loss {result.val_loss:.4f} (untrained {result.val_loss_init:.4f})"
        best = result.model_dir
    elif kind == "tokenmining_pretrain":
        from hilight.train.tokenmining import TokenMiningPretrainConfig, run_tokenmining_pretrain

        result = run_tokenmining_pretrain(load_config(path, TokenMiningPretrainConfig))
        m = result.metrics
        summary = (f"held-out answer loss {m['lm_loss']:.4f} (before training {m['lm_loss_initial']:.4f}, another clip's "
                   f"video {m['lm_loss_wrong_video']:.4f}, video tokens "
                   f"zeroed {m['lm_loss_zero_video']:.4f}, no video {m['lm_loss_no_video']:.4f})")
        best = result.best_dir
    else:
        typer.secho(f"{config}: `hilight train` runs clipvip_alignment, llm_pretrain and tokenmining_pretrain configs, "
                    f"not {kind!r}; use `hilight run {kind} -c {config}`", fg="red", err=True)
        raise typer.Exit(2)
    fit = result.fit
    resumed = "fresh start" if fit.resumed_from is None else f"resumed from step {fit.resumed_from}"
    typer.echo(f"trained {fit.step} steps ({resumed}; {fit.skipped_steps} skipped) in {result.run_dir}")
    typer.echo(f"best model      {best}")
    typer.echo(summary)


@app.command("run")
def run(
    pipeline: str = typer.Argument(..., help="Pipeline name, e.g. data_validation."),
    config: Path = typer.Option(..., "--config", "-c", help="Config YAML for that pipeline."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Re-run every step even if cached."),
    run_name: Optional[str] = typer.Option(None, help="ZenML run name (default: generated)."),
) -> None:
    """Run a ZenML pipeline on the project-local stack, tracked in MLflow."""
    from pipelines.run import PipelineFailedError, run_pipeline

    try:
        result = run_pipeline(pipeline, resolve_path(config), enable_cache=False if no_cache else None, run_name=run_name)
    except PipelineFailedError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"pipeline {pipeline} finished: run {getattr(result, 'name', result)}")


@app.command("demo")
def demo(
    videos: int = typer.Option(200, "--videos", "-n", help="Clips per domain."),
    seed: int = typer.Option(0, help="Data seed."),
    workers: int = typer.Option(min(4, os.cpu_count() or 1), help="Worker processes for synthesis."),
) -> None:
    """Synthetic billiards + general data → validation → general pretraining ("original") → billiards alignment
    ("table1k") → ablation of the four local-loss placements → the demo LLM → stage 1 (TokenMining pretraining), each a tracked
    ZenML pipeline run."""
    from hilight.data.synth import GENERATOR_VERSION, generate_dataset

    root = project_root()
    for domain in ("billiards", "general"):
        out = root / "data" / "synth" / domain
        meta = out / "dataset.json"
        current = json.loads(meta.read_text()) if meta.is_file() else {}
        if (current.get("n_videos"), current.get("seed"), current.get("version")) == (videos, seed, GENERATOR_VERSION):
            typer.echo(f"{domain}: reusing {out}")
            continue
        generate_dataset(out, domain=domain, n_videos=videos, seed=seed, workers=workers)

    from pipelines.run import PipelineFailedError, run_pipeline, step_output
    from pipelines.stack import mlflow_tracking_uri

    try:
        result = run_pipeline("data_validation", root / DEMO_CONFIG)
        trained = {}
        for label, cfg in DEMO_TRAINING:
            run = run_pipeline("clipvip_alignment", root / cfg)
            trained[label] = (run.name, step_output(run, "train_clipvip", "heldout_retrieval"))
        ablation = run_pipeline("alignment_ablation", root / DEMO_ABLATION)
        comparison = step_output(ablation, "compare_variants", "ablation_comparison")
        selection = step_output(ablation, "compare_variants", "ablation_selection")
        llm_run = run_pipeline("llm_pretrain", root / DEMO_LLM)
        llm_loss = step_output(llm_run, "pretrain_llm", "llm_heldout_loss")
        stage1 = run_pipeline("tokenmining_pretrain", root / DEMO_STAGE1)
        stage1_loss = step_output(stage1, "train_token_mining", "stage1_heldout")
    except PipelineFailedError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(1) from None
    manifest = json.loads((root / "outputs" / "data_validation" / "manifest.json").read_text())
    typer.echo("\n" + "=" * 72)
    typer.echo(f"data_validation run   {result.name}")
    typer.echo(f"data fingerprint      {manifest['data_fingerprint']}")
    typer.echo(f"accepted / rejected   {manifest['counts']}")
    typer.echo(f"manifest              {root / 'outputs/data_validation'}/{{videos,captions,qa}}.parquet")
    typer.echo(f"report                {root / 'outputs/data_validation/report.md'}")
    for label, (run_name, m) in trained.items():
        typer.echo(f"{label:<22}run {run_name}: held-out text->video R@1 {m['t2v_r1']:.3f} "
                   f"(random init {m['random_init/t2v_r1']:.3f}), median rank {m['t2v_median_rank']:.0f} "
                   f"(random init {m['random_init/t2v_median_rank']:.0f})")
    typer.echo(f"models                {root / 'outputs/pretrain_general/best'}  (\"original\"),  "
               f"{root / 'outputs/alignment/best'}  (\"table1k\")")
    chosen = [f"{r['variant']}@{r['step']}" for r in selection["ranking"]] + [r["variant"] for r in selection["references"]]
    cols = ["caption/top1_accuracy", "caption/hard_negative_accuracy", "say_more/short_wins", "retrieval/t2v_r1"]
    shown = comparison.set_index("label").loc[chosen, cols]
    shown.columns = [c.split("/", 1)[1] for c in cols]
    typer.echo(f"ablation run          {ablation.name} (held-out billiards; each variant at its best checkpoint):")
    typer.echo("    " + shown.round(3).to_string().replace("\n", "\n    "))
    rule = selection["rule"]
    typer.echo(f"selected variant      {selection['winner']['variant']} at {selection['winner']['checkpoint']} "
               f"({rule['mode']} {rule['metric']}); report {root / 'outputs/ablation/report'}")
    typer.echo(f"demo LLM              run {llm_run.name}: held-out text loss {llm_loss['lm_loss']:.3f} "
               f"(untrained {llm_loss['lm_loss_untrained']:.3f}); {root / 'outputs/llm_pretrain/model'}")
    typer.echo(f"stage 1 TokenMining   run {stage1.name}: held-out answer loss {stage1_loss['lm_loss']:.3f} "
               f"(before training {stage1_loss['lm_loss_initial']:.3f}; another clip's video "
               f"{stage1_loss['lm_loss_wrong_video']:.3f}; video tokens zeroed "
               f"{stage1_loss['lm_loss_zero_video']:.3f}; no video {stage1_loss['lm_loss_no_video']:.3f})")
    typer.echo(f"                      weights {root / 'outputs/tokenmining/best'} (safetensors + reference token_mining.bin)")
    typer.echo(f"MLflow store          {mlflow_tracking_uri()}")
    typer.echo("MLflow UI             hilight ui   (then open http://127.0.0.1:5000, experiments 'data_validation', "
               "'clipvip_alignment', 'alignment_ablation', 'llm_pretrain', 'tokenmining_pretrain')")


@app.command("ui")
def ui(
    port: int = typer.Option(5000, help="Port to listen on."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind (default: local only)."),
) -> None:
    """Start the MLflow UI on the project's tracking store (Ctrl-C to stop)."""
    from pipelines.stack import configure_zenml, ensure_stack, mlflow_tracking_uri

    configure_zenml()
    ensure_stack()
    uri = mlflow_tracking_uri()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    if uri.startswith("sqlite:///"):
        artifacts = Path(uri[len("sqlite:///"):]).parent / "mlflow_artifacts"
        cmd += ["--default-artifact-root", artifacts.as_uri()]
    typer.echo(f"MLflow UI on http://{host}:{port}  (store {uri})")
    raise typer.Exit(subprocess.call(cmd))


@app.command("stack")
def stack() -> None:
    """Create (idempotently) and show the project-local ZenML stack."""
    from pipelines.stack import ensure_stack, mlflow_tracking_uri

    name = ensure_stack()
    typer.echo(f"ZenML config  {os.environ['ZENML_CONFIG_PATH']}\nactive stack  {name}\nMLflow store  {mlflow_tracking_uri()}")


if __name__ == "__main__":
    app()
