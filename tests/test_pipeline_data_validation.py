"""Smoke test of the data_validation pipeline in an isolated ZenML store and MLflow DB."""

from __future__ import annotations

import json
import shutil

import pytest

pytestmark = pytest.mark.pipeline

CONFIG = """# hilight run data_validation -c config.yaml
pipeline: data_validation
datasets:
  - {name: billiards, root: data/billiards, captions: [captions.json], qa: [qa.json]}
  - {name: general, domain: general, root: data/general, captions: [captions.json], qa: [qa.json]}
output_dir: outputs/dv
probe: {workers: 2}
progress: false
"""


def test_data_validation_pipeline_tracks_and_caches_by_fingerprint(zenml_project, billiards_dir, general_dir):
    import mlflow
    from zenml.client import Client
    from zenml.enums import ExecutionStatus

    from hilight.data.captions import read_caption_manifest
    from pipelines.run import run_pipeline
    from pipelines.stack import mlflow_tracking_uri

    root = zenml_project
    shutil.copytree(billiards_dir, root / "data" / "billiards")
    shutil.copytree(general_dir, root / "data" / "general")
    (root / "config.yaml").write_text(CONFIG)

    run = run_pipeline("data_validation", root / "config.yaml")
    run = Client().get_pipeline_run(run.id)
    assert run.status == ExecutionStatus.COMPLETED
    assert str(Client().zen_store.url).startswith(f"sqlite:///{root}")
    manifest = json.loads((root / "outputs/dv/manifest.json").read_text())
    assert manifest["counts"]["videos_accepted"] == 32 and manifest["counts"]["captions_rejected"] == 0

    uri = mlflow_tracking_uri()
    assert uri.startswith(f"sqlite:///{root}/.zenml/")
    client = mlflow.MlflowClient(uri)
    (mrun,) = client.search_runs([client.get_experiment_by_name("data_validation").experiment_id])
    tags, params, metrics = mrun.data.tags, mrun.data.params, mrun.data.metrics
    assert tags["hilight.data_fingerprint"] == manifest["data_fingerprint"]
    assert tags["hilight.zenml_run_id"] == str(run.id) and tags["hilight.pipeline"] == "data_validation"
    assert tags["hilight.git_commit"]
    assert params["contract.videos"] == "video_files@1.1.0" and params["contract.qa"] == "video_qa@1.1.0"
    assert params["probe.workers"] == "2"
    assert metrics["videos_accepted"] == 32 and metrics["reject_rate.captions"] == 0.0
    artifacts = {a.path for a in client.list_artifacts(mrun.info.run_id, "data_validation")}
    assert {f"data_validation/{n}" for n in ("videos.parquet", "captions.parquet", "qa.parquet", "quarantine.parquet",
                                             "ge_results.json", "report.md", "manifest.json")} <= artifacts
    assert "config/resolved_config.json" in {a.path for a in client.list_artifacts(mrun.info.run_id, "config")}

    # same data: everything after the (never cached) fingerprint step comes from the cache
    rerun = Client().get_pipeline_run(run_pipeline("data_validation", root / "config.yaml").id)
    status = {name: s.status for name, s in rerun.steps.items()}
    assert status["fingerprint_data"] == ExecutionStatus.COMPLETED
    assert status["load_annotations"] == status["write_manifest"] == ExecutionStatus.CACHED

    # new data under the same path: the cache key sees the new fingerprint
    original = (root / "data/billiards/captions.json").read_bytes()
    caps = json.loads(original)
    caps[0]["captions"].append({"caption": "A new caption about the table", "object": "table"})
    (root / "data/billiards/captions.json").write_text(json.dumps(caps))
    fresh = Client().get_pipeline_run(run_pipeline("data_validation", root / "config.yaml").id)
    assert {n: s.status for n, s in fresh.steps.items()}["load_annotations"] == ExecutionStatus.COMPLETED
    new_manifest = json.loads((root / "outputs/dv/manifest.json").read_text())
    assert new_manifest["data_fingerprint"] != manifest["data_fingerprint"]
    assert new_manifest["counts"]["captions_accepted"] == manifest["counts"]["captions_accepted"] + 1
    runs = client.search_runs([client.get_experiment_by_name("data_validation").experiment_id])
    assert {r.data.tags["hilight.data_fingerprint"] for r in runs} == {manifest["data_fingerprint"], new_manifest["data_fingerprint"]}

    # back to the first data: write_manifest comes from the cache, and the first manifest is current again
    (root / "data/billiards/captions.json").write_bytes(original)
    back = Client().get_pipeline_run(run_pipeline("data_validation", root / "config.yaml").id)
    status = {n: s.status for n, s in back.steps.items()}
    assert status["write_manifest"] == ExecutionStatus.CACHED and status["publish_manifest"] == ExecutionStatus.COMPLETED
    assert json.loads((root / "outputs/dv/manifest.json").read_text()) == manifest
    assert read_caption_manifest(root / "outputs/dv").fingerprint == manifest["data_fingerprint"]


def test_pipeline_fails_past_threshold(zenml_project, billiards_dir, caplog):
    from pipelines.run import run_pipeline

    root = zenml_project
    shutil.copytree(billiards_dir, root / "data" / "billiards")
    for p in sorted((root / "data/billiards/videos").glob("*.mp4"))[:6]:
        p.write_bytes(b"")
    (root / "config.yaml").write_text(CONFIG.replace("  - {name: general, domain: general, root: data/general, captions: [captions.json], qa: [qa.json]}\n", ""))
    with pytest.raises(RuntimeError, match="failed: step write_manifest: data rejected by contract") as err:
        run_pipeline("data_validation", root / "config.yaml")
    assert "videos/billiards: 6/24 rejected (25.0% > 10%)" in str(err.value)
    (failed,) = (root / "outputs/dv/versions").iterdir()  # the failed run is kept aside, never made current
    assert "videos:zero_byte_file x6" in str(err.value) and f"{failed}/report.md" in str(err.value)
    assert failed.name.endswith("_failed") and not (root / "outputs/dv/current").exists()
    # the step's own error names the threshold, the top reasons and the report
    assert "videos/billiards: 6/24 rejected (25.0% > 10%)" in caplog.text
    assert "videos:zero_byte_file x6" in caplog.text and f"{failed}/report.md" in caplog.text
    assert (failed / "quarantine.parquet").is_file()
