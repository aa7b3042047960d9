"""`hilight retrain --if-new-data`: new billiards clips trigger validation → selection and a new champion; unchanged
data does not; the retrain prunes old feature-cache directories when configured; a second retrain while one holds the
lock exits 75; the local orchestrator refuses schedules clearly."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import yaml

from tests.conftest import selection_config

pytestmark = pytest.mark.pipeline


def _add_clips(dataset, extra):
    """Append another synthetic dataset's clips (distinct ids) to ``dataset``: videos and every JSON table."""
    for video in (extra / "videos").iterdir():
        shutil.copy(video, dataset / "videos" / video.name)
    for name in ("captions.json", "qa.json", "events.json", "negatives.json", "probes.json"):
        rows = json.loads((dataset / name).read_text()) + json.loads((extra / name).read_text())
        (dataset / name).write_text(json.dumps(rows))


def _accepted(manifest) -> int:
    return json.loads((manifest / "manifest.json").read_text())["counts"]["videos_accepted"]


def test_new_clips_trigger_a_retrain_and_unchanged_data_does_not(zenml_project, dataset_copy, general_dir, vlm_weights,
                                                                 tiny_settings, tmp_path):
    import mlflow
    from filelock import FileLock
    from typer.testing import CliRunner

    from hilight.cli import app
    from hilight.data.feature_cache import FeatureCache, cache_dirs
    from hilight.data.hashcache import STATS
    from hilight.data.synth import generate_dataset
    from pipelines.run import run_pipeline, run_retrain
    from pipelines.stack import mlflow_tracking_uri

    root = zenml_project
    validation = {"pipeline": "data_validation", "output_dir": str(root / "outputs" / "data_validation"),
                  "progress": False, "probe": {"workers": 1},
                  "datasets": [{"name": "billiards", "root": str(dataset_copy), "captions": ["captions.json"],
                                "qa": ["qa.json"]},
                               {"name": "general", "domain": "general", "root": str(general_dir),
                                "captions": ["captions.json"], "qa": ["qa.json"]}]}
    (root / "validation.yaml").write_text(yaml.safe_dump(validation))
    run_pipeline("data_validation", root / "validation.yaml")  # the manifest the selection config points at
    manifest = root / "outputs" / "data_validation"
    (root / "selection.yaml").write_text(yaml.safe_dump(
        selection_config(root, manifest, vlm_weights, dataset_copy, general_dir)))
    cfg = root / "retrain.yaml"
    cfg.write_text(yaml.safe_dump({"pipeline": "retrain", "watch": ["billiards"], "data_validation": "validation.yaml",
                                   "training": [], "selection": "selection.yaml",
                                   "lock_file": "outputs/retrain.lock"}))

    first = run_retrain(cfg, if_new_data=True)
    assert first["due"] and "no hilight-vlm@champion" in first["reason"] and len(first["runs"]) == 2
    mlflow.set_tracking_uri(mlflow_tracking_uri())
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias("hilight-vlm", "champion")
    assert champion.tags["hilight.dataset_fingerprint.billiards"] == first["current"]["billiards"]

    before = _accepted(manifest)
    STATS.reset()
    unchanged = CliRunner().invoke(app, ["retrain", "--if-new-data", "-c", str(cfg)])
    assert unchanged.exit_code == 0 and "no retrain: billiards unchanged" in unchanged.output
    # the check used the stat-keyed hash cache: every watched file was stat-ed, none was read
    assert STATS.hashed == 0 and STATS.hits == len(list((dataset_copy / "videos").iterdir())) + 2

    _add_clips(dataset_copy, generate_dataset(tmp_path / "extra", domain="billiards", n_videos=4, seed=9,
                                              settings=tiny_settings, progress=False))
    # prune the stage-1 feature cache after this retrain; a directory of weights no run uses any more waits there
    features = root / "unused" / "features"
    live = {c.path for c in cache_dirs(features)}
    assert len(live) == 2  # one per candidate's CLIP-ViP weights
    stale = FeatureCache(features, {"clipvip": "weights of a champion long gone"}).dir
    os.utime(stale / "last_used", (time.time() - 10 * 86400,) * 2)
    cfg.write_text(yaml.safe_dump({**yaml.safe_load(cfg.read_text()),
                                   "prune_feature_cache": {"dir": str(features), "keep": 2}}))
    second = run_retrain(cfg, if_new_data=True)
    assert [p["dir"] for p in second["pruned"]] == [str(stale)]
    assert {c.path for c in cache_dirs(features)} == live
    assert second["due"] and "new data in billiards" in second["reason"] and len(second["runs"]) == 2
    assert second["current"]["billiards"] != first["current"]["billiards"]
    assert second["recorded"]["billiards"] == first["current"]["billiards"]
    # the retrained model is gated by the incumbent (issue 15): champion when it won, else challenger
    now = client.get_model_version_by_alias("hilight-vlm", "champion" if second["decision"]["promoted"] else "challenger")
    assert now.tags["hilight.dataset_fingerprint.billiards"] == second["current"]["billiards"]
    assert _accepted(manifest) == before + 4  # the new clips went through validation into the manifest

    with FileLock(root / "outputs" / "retrain.lock", timeout=0):
        locked = CliRunner().invoke(app, ["retrain", "--if-new-data", "-c", str(cfg)])
    assert locked.exit_code == 75 and "another retrain holds" in locked.output

    refused = CliRunner().invoke(app, ["retrain", "--schedule", "-c", str(cfg)])
    assert refused.exit_code == 1 and "does not run schedules" in refused.output and "cron" in refused.output
