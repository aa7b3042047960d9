"""Smoke test of the alignment_ablation pipeline in an isolated ZenML store and MLflow DB: two tiny variants and a
reference, evaluated at two checkpoints; the comparison table, selection and MLflow artifacts are checked."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import alignment_config

pytestmark = pytest.mark.pipeline


def _reference(root, manifest):
    """A saved "original" model dir (random weights, its own tokenizer), as the pretraining stage exports it."""
    import pandas as pd

    from hilight.models.checkpoints import save_model
    from hilight.models.clipvip import build_clipvip, load_preset
    from hilight.models.tokenizers import build_clip_tokenizer

    out = root / "original"
    config = load_preset("tiny")
    save_model(build_clipvip(config, seed=1), out, {"family": "clipvip", "model": config.model_dump(mode="json")})
    captions = pd.read_parquet(manifest / "captions.parquet")["caption"].tolist()
    build_clip_tokenizer(captions, out / "tokenizer", vocab_size=1024, max_length=16)
    return out


def test_ablation_pipeline_compares_selects_and_logs(zenml_project, caption_manifest, billiards_dir):
    import mlflow
    from zenml.client import Client
    from zenml.enums import ExecutionStatus

    from pipelines.run import run_pipeline, step_output
    from pipelines.stack import mlflow_tracking_uri

    root = zenml_project
    base = root / "alignment.yaml"
    base.write_text(yaml.safe_dump(alignment_config(caption_manifest, root / "unused")))
    cfg = root / "ablation.yaml"
    cfg.write_text("# hilight run alignment_ablation -c ablation.yaml\n" + yaml.safe_dump({
        "pipeline": "alignment_ablation", "name": "abl", "base": str(base), "output_dir": str(root / "outputs" / "abl"),
        "base_overrides": {"train": {"keep_last": 3}},
        "variants": [{"name": "BP_WithMask", "overrides": {"loss": {"local": {"placement": "before_projector"}}}},
                     {"name": "AE_WithMask", "overrides": {"loss": {"local": {"placement": "after_embedding"}}}}],
        "eval": {"negatives": {"billiards": str(billiards_dir / "negatives.json")},
                 "probes": {"billiards": str(billiards_dir / "probes.json")}, "checkpoints": [4, 6],
                 "references": {"original": {"path": str(_reference(root, caption_manifest))}},
                 "attention": {"videos": 1}, "heatmap_videos": 1},
        "selection": {"metric": "caption/top1_accuracy", "tie_breakers": [{"metric": "caption/margin"}]},
    }))
    run = Client().get_pipeline_run(run_pipeline("alignment_ablation", cfg).id)
    assert run.status == ExecutionStatus.COMPLETED

    table = step_output(run, "compare_variants", "ablation_comparison")
    assert sorted(zip(table["variant"], table["step"], strict=True)) == [
        ("AE_WithMask", 4), ("AE_WithMask", 6), ("BP_WithMask", 4), ("BP_WithMask", 6), ("original", 0)]
    expected = {"label", "checkpoint", "is_best", "path", "caption/top1_accuracy", "caption/margin", "caption/mrr",
                "caption/gt_rank_mean", "caption/score/gt", "caption/score/hard_negative", "caption/score/unrelated",
                "caption/hard_negative_accuracy", "caption/hard_negative_accuracy/colour", "say_more/short_wins",
                "retrieval/t2v_r1", "retrieval/v2t_r10", "retrieval/t2v_median_rank", "logit_scale"}
    assert expected <= set(table.columns), expected - set(table.columns)
    assert table["caption/num_videos"].nunique() == 1  # every model scored on the same held-out set
    assert table[["caption/top1_accuracy", "say_more/short_wins", "retrieval/t2v_r1"]].apply(
        lambda c: c.between(0, 1).all()).all()

    selection = step_output(run, "compare_variants", "ablation_selection")
    winner = selection["winner"]
    trained = table[table["variant"] != "original"]
    assert winner["variant"] in {"BP_WithMask", "AE_WithMask"}
    assert winner["caption/top1_accuracy"] == trained["caption/top1_accuracy"].max()
    assert [r["variant"] for r in selection["references"]] == ["original"]
    # the selection metric has a bootstrap interval over the held-out clips per variant (issue 15)
    assert set(selection["intervals"]) == {"BP_WithMask", "AE_WithMask", "original"}
    iv = selection["intervals"][winner["variant"]]
    assert iv["low"] <= winner["caption/top1_accuracy"] <= iv["high"] and iv["items"] == table["caption/num_videos"].iloc[0]
    assert isinstance(selection["inconclusive"], bool) and "caption/top1_accuracy" in selection["significance"]
    # the negatives and probes went through their data contracts; evaluation read the accepted records
    eval_inputs = step_output(run, "locate_eval_data", "eval_inputs")
    assert eval_inputs["rejected:negatives:billiards"] == "0" and eval_inputs["rejected:probes:billiards"] == "0"
    accepted = json.loads(open(eval_inputs["validated:negatives:billiards"]).read())
    assert len(accepted) == len(json.loads((billiards_dir / "negatives.json").read_text()))

    client = mlflow.MlflowClient(mlflow_tracking_uri())
    exp = client.get_experiment_by_name("alignment_ablation").experiment_id
    runs = {r.info.run_name: r for r in client.search_runs([exp])}
    assert {"train_BP_WithMask", "train_AE_WithMask", "evaluate_BP_WithMask", "evaluate_AE_WithMask",
            "evaluate_original", run.name} <= set(runs)
    parent = runs[run.name]
    for child in ("train_BP_WithMask", "evaluate_AE_WithMask", "evaluate_original"):
        assert runs[child].data.tags["mlflow.parentRunId"] == parent.info.run_id
    history = client.get_metric_history(runs["evaluate_BP_WithMask"].info.run_id, "caption/top1_accuracy")
    assert sorted(m.step for m in history) == [4, 6]  # the metric over training, one point per checkpoint
    assert len(client.get_metric_history(runs["train_AE_WithMask"].info.run_id, "train/local_loss")) == 6

    assert parent.data.tags["hilight.selected_variant"] == winner["variant"]
    assert parent.data.tags["hilight.selected_checkpoint"] == winner["checkpoint"]
    assert parent.data.tags["hilight.selection_inconclusive"] == str(selection["inconclusive"])
    files = {a for d in ("ablation", "ablation/plots", "ablation/attention") for a in
             (f.path for f in client.list_artifacts(parent.info.run_id, d))}
    assert {"ablation/comparison.parquet", "ablation/comparison.json", "ablation/selection.json",
            "ablation/caption_scores.parquet", "ablation/plots/metric_bars.png", "ablation/plots/loss_curves.png",
            "ablation/plots/metrics_by_checkpoint.png"} <= files, files
    assert sum(p.startswith("ablation/plots/scores_") for p in files) == 1
    (grid,) = [p for p in files if p.startswith("ablation/attention/") and p.endswith(".png")]
    gifs = client.list_artifacts(parent.info.run_id, grid.removesuffix(".png"))
    assert len(gifs) == 5 and all(g.path.endswith(".gif") for g in gifs)  # one per evaluated model
    saved = json.loads(open(client.download_artifacts(parent.info.run_id, "ablation/selection.json")).read())
    assert saved["winner"] == winner

    # nothing changed: training and evaluation are cache hits
    rerun = Client().get_pipeline_run(run_pipeline("alignment_ablation", cfg).id)
    assert all(rerun.steps[s].status == ExecutionStatus.CACHED
               for s in ("train_BP_WithMask", "train_AE_WithMask", "evaluate_BP_WithMask", "evaluate_original"))


def test_a_variant_that_is_the_promoted_alignment_run_comes_from_zenmls_cache(zenml_project, caption_manifest,
                                                                             billiards_dir):
    """The demo's BP_WithMask is alignment_demo's run (``config:``): after `hilight run clipvip_alignment`, the
    ablation evaluates that run's kept checkpoints without training it again."""
    from zenml.client import Client
    from zenml.enums import ExecutionStatus

    from pipelines.run import run_pipeline, step_output

    root = zenml_project
    promoted = root / "alignment.yaml"
    promoted.write_text(yaml.safe_dump(alignment_config(caption_manifest, root / "outputs" / "table1k", keep_every=2)))
    aligned = Client().get_pipeline_run(run_pipeline("clipvip_alignment", promoted).id)
    trained = step_output(aligned, "train_clipvip", "training_run")
    cfg = root / "ablation.yaml"
    cfg.write_text(yaml.safe_dump({
        "pipeline": "alignment_ablation", "name": "abl", "base": str(promoted), "output_dir": str(root / "outputs" / "abl"),
        "variants": [{"name": "BP", "config": str(promoted)},
                     {"name": "AE", "overrides": {"loss": {"local": {"placement": "after_embedding"}}}}],
        "eval": {"negatives": {"billiards": str(billiards_dir / "negatives.json")}, "checkpoints": [2, 4, 6],
                 "attention": {"videos": 1}, "heatmap_videos": 1},
        "selection": {"metric": "caption/hard_negative_accuracy", "tie_breakers": [], "checkpoint": "final"},
    }))
    run = Client().get_pipeline_run(run_pipeline("alignment_ablation", cfg).id)
    assert run.status == ExecutionStatus.COMPLETED
    assert run.steps["train_BP"].status == ExecutionStatus.CACHED  # the alignment pipeline's run, not a new one
    assert run.steps["train_AE"].status == ExecutionStatus.COMPLETED
    reused = run.steps["train_BP"].outputs["training_run"][0].load()
    assert reused["run_dir"] == trained["run_dir"] and reused["mlflow_run_id"] == trained["mlflow_run_id"]
    table = step_output(run, "compare_variants", "ablation_comparison")
    bp = table[table["variant"] == "BP"]
    assert sorted(bp["step"]) == [2, 4, 6] and all(p.startswith(trained["run_dir"]) for p in bp["path"])


def test_ablation_with_seeds_trains_each_variant_per_seed(zenml_project, caption_manifest, billiards_dir):
    """``seeds: [0, 1]``: one training per (variant, seed); each variant is represented by the mean over its seeds'
    chosen checkpoints, with its standard deviation, the per-seed winners and an interval over its clips and seeds."""
    from zenml.client import Client
    from zenml.enums import ExecutionStatus

    from pipelines.run import run_pipeline, step_output

    root = zenml_project
    base = root / "alignment.yaml"
    base.write_text(yaml.safe_dump(alignment_config(caption_manifest, root / "unused", max_steps=4, val_every=4,
                                                    ckpt_every=4)))
    cfg = root / "ablation.yaml"
    cfg.write_text("# hilight run alignment_ablation -c ablation.yaml\n" + yaml.safe_dump({
        "pipeline": "alignment_ablation", "name": "abl", "base": str(base), "output_dir": str(root / "outputs" / "abl"),
        "seeds": [0, 1],
        "variants": [{"name": "BP", "overrides": {"loss": {"local": {"placement": "before_projector"}}}},
                     {"name": "AE", "overrides": {"loss": {"local": {"placement": "after_embedding"}}}}],
        "eval": {"negatives": {"billiards": str(billiards_dir / "negatives.json")}, "checkpoints": [4],
                 "attention": {"videos": 1}, "heatmap_videos": 1},
        "selection": {"metric": "caption/hard_negative_accuracy", "tie_breakers": []},
    }))
    run = Client().get_pipeline_run(run_pipeline("alignment_ablation", cfg).id)
    assert run.status == ExecutionStatus.COMPLETED
    assert {f"train_{v}_seed{s}" for v in ("BP", "AE") for s in (0, 1)} <= set(run.steps)
    table = step_output(run, "compare_variants", "ablation_comparison")
    assert sorted(table["label"]) == ["AE#s0@4", "AE#s1@4", "BP#s0@4", "BP#s1@4"]
    selection = step_output(run, "compare_variants", "ablation_selection")
    metric = "caption/hard_negative_accuracy"
    means = table.groupby("variant")[metric].mean()
    assert selection["winner"]["variant"] == means.idxmax()
    assert {r["variant"]: r[metric] for r in selection["ranking"]} == pytest.approx(means.to_dict())
    assert all(len(r["seeds"]) == 2 and r[f"{metric}/sd"] is not None for r in selection["ranking"])
    assert set(selection["per_seed_winners"]) == {"0", "1"}
    assert selection["intervals"]["BP"]["estimate"] == pytest.approx(means["BP"])
    assert selection["intervals"]["BP"]["seeds"] == 2  # the runs resampled as well as the clips
