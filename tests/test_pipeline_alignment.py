"""Smoke test of the clipvip_alignment pipeline in an isolated ZenML store and MLflow DB."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import alignment_config

pytestmark = pytest.mark.pipeline


def test_alignment_pipeline_tracks_everything_and_caches(zenml_project, caption_manifest, monkeypatch):
    import mlflow
    from zenml.client import Client
    from zenml.enums import ExecutionStatus

    from pipelines.run import run_pipeline, step_output
    from pipelines.stack import mlflow_tracking_uri

    root = zenml_project
    cfg = root / "alignment.yaml"
    cfg.write_text("# hilight run clipvip_alignment -c alignment.yaml\n"
                   + yaml.safe_dump(alignment_config(caption_manifest, root / "outputs" / "alignment")))
    run = Client().get_pipeline_run(run_pipeline("clipvip_alignment", cfg).id)
    assert run.status == ExecutionStatus.COMPLETED
    retrieval = step_output(run, "train_clipvip", "heldout_retrieval")
    assert {"t2v_r1", "v2t_r5", "random_init/t2v_r1"} <= set(retrieval)

    client = mlflow.MlflowClient(mlflow_tracking_uri())
    (mrun,) = client.search_runs([client.get_experiment_by_name("clipvip_alignment").experiment_id])
    rid, tags, params = mrun.info.run_id, mrun.data.tags, mrun.data.params
    assert tags["hilight.zenml_run_id"] == str(run.id) and tags["hilight.pipeline"] == "clipvip_alignment"
    assert tags["hilight.data_fingerprint"] and tags["hilight.git_commit"]
    assert tags["hilight.best_checkpoint"].startswith("checkpoints/step-")
    assert params["loss.local.placement"] == "before_projector" and params["train.lr"] == "0.001"
    history = {k: client.get_metric_history(rid, k) for k in ("train/loss", "train/global_loss", "train/local_loss",
                                                               "train/lr", "train/grad_norm", "train/samples_per_s")}
    assert all(len(h) == 6 for h in history.values()), {k: len(h) for k, h in history.items()}  # every step
    assert [m.step for m in history["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert len(client.get_metric_history(rid, "val/t2v_r1")) == 2
    assert "heldout/t2v_r1" in mrun.data.metrics and "heldout_random_init/t2v_r1" in mrun.data.metrics
    # tracking.checkpoints defaults to best_and_final: the best and the last step's weights, nothing in between
    ckpts = {a.path for a in client.list_artifacts(rid, "checkpoints")}
    assert ckpts == {f"checkpoints/step-{int(tags['hilight.best_step']):08d}", "checkpoints/step-00000006"}
    assert "model/best/model.safetensors" in {a.path for a in client.list_artifacts(rid, "model/best")}
    assert "config/resolved_config.json" in {a.path for a in client.list_artifacts(rid, "config")}

    # nothing changed: the training step is a cache hit
    rerun = Client().get_pipeline_run(run_pipeline("clipvip_alignment", cfg).id)
    assert rerun.steps["train_clipvip"].status == ExecutionStatus.CACHED

    # the same config after a change to the library's code: trained again, not the old result from the cache
    import pipelines.stack

    assert len(pipelines.stack.code_digest()) == 64
    monkeypatch.setattr(pipelines.stack, "code_digest", lambda: "a changed library")
    changed = Client().get_pipeline_run(run_pipeline("clipvip_alignment", cfg).id)
    assert changed.steps["train_clipvip"].status == ExecutionStatus.COMPLETED
    assert changed.steps["locate_training_data"].status == ExecutionStatus.COMPLETED
