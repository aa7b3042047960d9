"""Smoke test of the llm_pretrain → tokenmining_pretrain pipelines in an isolated ZenML store and MLflow DB."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import llm_pretrain_config, tokenmining_config

pytestmark = pytest.mark.pipeline


def test_stage1_pipelines_track_losses_baselines_and_exports(zenml_project, caption_manifest, vlm_weights):
    import mlflow
    from zenml.client import Client
    from zenml.enums import ExecutionStatus

    from pipelines.run import run_pipeline, step_output
    from pipelines.stack import mlflow_tracking_uri

    root = zenml_project
    llm_cfg = root / "llm.yaml"
    llm_cfg.write_text("# hilight run llm_pretrain -c llm.yaml\n"
                       + yaml.safe_dump(llm_pretrain_config(caption_manifest, root / "outputs" / "llm", max_steps=10)))
    llm_run = Client().get_pipeline_run(run_pipeline("llm_pretrain", llm_cfg).id)
    llm_dir = step_output(llm_run, "pretrain_llm", "llm_dir")
    assert (llm_dir / "model.safetensors").is_file()

    cfg = root / "stage1.yaml"
    cfg.write_text("# hilight run tokenmining_pretrain -c stage1.yaml\n" + yaml.safe_dump(
        tokenmining_config(caption_manifest, root / "outputs" / "tokenmining", vlm_weights["clipvip"], llm_dir)))
    run = Client().get_pipeline_run(run_pipeline("tokenmining_pretrain", cfg).id)
    assert run.status == ExecutionStatus.COMPLETED
    heldout = step_output(run, "train_token_mining", "stage1_heldout")
    assert heldout["lm_loss"] < heldout["lm_loss_initial"]
    tm_dir = step_output(run, "train_token_mining", "token_mining_dir")
    assert {"model.safetensors", "config.json", "token_mining.bin"} <= {p.name for p in tm_dir.iterdir()}

    client = mlflow.MlflowClient(mlflow_tracking_uri())
    (mrun,) = client.search_runs([client.get_experiment_by_name("tokenmining_pretrain").experiment_id])
    rid, tags = mrun.info.run_id, mrun.data.tags
    assert tags["hilight.stage"] == "tokenmining_pretrain" and tags["hilight.zenml_run_id"] == str(run.id)
    assert tags["hilight.weights.clipvip"] and tags["hilight.weights.llm"]
    assert tags["hilight.weights.longclip"] == "random:tiny:0"
    val = client.get_metric_history(rid, "val/lm_loss")
    assert [m.step for m in val] == [0, 3, 6]  # before training, then every validation
    assert len(client.get_metric_history(rid, "val/lm_loss_zero_video")) == 3
    assert len(client.get_metric_history(rid, "train/lm_loss")) == 6
    assert {"heldout/lm_loss", "heldout/lm_loss_no_video", "features/computed"} <= set(mrun.data.metrics)
    assert {a.path for a in client.list_artifacts(rid, "token_mining/best")} >= {
        "token_mining/best/model.safetensors", "token_mining/best/token_mining.bin"}
    assert "stage1/heldout_loss.json" in {a.path for a in client.list_artifacts(rid, "stage1")}

    # nothing changed: no training step runs again
    rerun = Client().get_pipeline_run(run_pipeline("tokenmining_pretrain", cfg).id)
    assert rerun.steps["train_token_mining"].status == ExecutionStatus.CACHED
