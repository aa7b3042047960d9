"""``hilight train --track``: a training job started outside the pipelines is recorded in MLflow, once, however many
processes the launcher starts."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml

from tests.conftest import REPO, alignment_config, free_port


def test_two_process_train_with_track_records_one_run(zenml_project, caption_manifest):
    import mlflow

    from hilight.data.manifest import open_manifest
    from pipelines.stack import configure_zenml, ensure_stack, mlflow_tracking_uri

    config = alignment_config(caption_manifest, zenml_project / "out", max_steps=4, batch_size=4, ckpt_every=2,
                              val_every=2, warmup_steps=1)
    path = zenml_project / "alignment.yaml"
    path.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "hilight.cli", "train", "--track", "-c", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "true"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]

    configure_zenml()
    ensure_stack()
    client = mlflow.MlflowClient(mlflow_tracking_uri())
    experiment = client.get_experiment_by_name("clipvip_alignment")
    (run,) = client.search_runs([experiment.experiment_id])  # one run for the two processes
    tags, run_id = run.data.tags, run.info.run_id
    assert run.info.status == "FINISHED"
    assert tags["hilight.launcher"] == "hilight train" and tags["hilight.processes"] == "2"
    assert tags["hilight.data_fingerprint"] == open_manifest(caption_manifest)[1]["data_fingerprint"]
    assert run.data.params["train.max_steps"] == "4"
    inputs = client.get_run(run_id).inputs.dataset_inputs  # the data it read, as the pipeline steps log it
    assert {(i.dataset.name, {t.key: t.value for t in i.tags}["mlflow.data.context"]) for i in inputs} == {
        ("billiards[train]", "training"), ("billiards[val+test]", "evaluation")}
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(run_id, "val/t2v_r1")] == [2, 4]
    retrieval = run.data.metrics
    assert 0 <= retrieval["heldout/t2v_r1"] <= 1 and 0 <= retrieval["heldout_random_init/t2v_r1"] <= 1
    best = {a.path for a in client.list_artifacts(run_id, "model/best")}
    assert best and {p.split("/")[-1] for p in best} == {p.name for p in (zenml_project / "out" / "best").iterdir()}
    assert tags["hilight.best_model"] == str(zenml_project / "out" / "best")
