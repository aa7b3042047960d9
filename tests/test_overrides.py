"""``key.path=value`` config overrides: parsed as YAML, validated with the file, recorded by MLflow."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hilight.config import ConfigError, apply_overrides, load_config
from tests.conftest import alignment_config

HILIGHT = Path(sys.executable).with_name("hilight")


def test_values_are_yaml_and_paths_nest():
    raw = {"train": {"lr": 1e-3, "batch_size": 8}, "data": {"sources": [{"ratio": 1.0}, {"ratio": 2.0}]}}
    out = apply_overrides(raw, ["train.lr=1e-4", "train.progress=false", "data.train_datasets=[billiards, general]",
                                "data.sources.1.ratio=0.5", "model.preset=tiny", "name=run 2", "train.resume="])
    assert out["train"] == {"lr": 1e-4, "batch_size": 8, "progress": False, "resume": None}
    assert out["data"]["train_datasets"] == ["billiards", "general"]
    assert out["data"]["sources"] == [{"ratio": 1.0}, {"ratio": 0.5}]
    assert out["model"] == {"preset": "tiny"} and out["name"] == "run 2"
    assert raw["train"] == {"lr": 1e-3, "batch_size": 8}  # the file's dict is left alone


@pytest.mark.parametrize("override, message", [
    ("train.lr", "is not KEY.PATH=VALUE"),
    ("train..lr=1", "is not KEY.PATH=VALUE"),
    ("train.lr.x=1", "train.lr is 0.001, not a mapping"),
    ("data.sources.5.ratio=1", "data.sources is a list of 2; '5' is not an index"),
    ("train.lr=[1, 2", "the value is not valid YAML"),
])
def test_malformed_overrides_are_config_errors(override, message):
    raw = {"train": {"lr": 1e-3}, "data": {"sources": [{"ratio": 1.0}, {"ratio": 2.0}]}}
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("[", r"\[")):
        apply_overrides(raw, [override])


def test_overrides_are_validated_by_the_model(tmp_path):
    from hilight.train.alignment import AlignmentConfig

    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump(alignment_config(tmp_path / "manifest", tmp_path / "out")))
    cfg = load_config(path, AlignmentConfig, ["train.lr=2e-4", "train.max_steps=3", "data.train_datasets=[general]"])
    assert (cfg.train.lr, cfg.train.max_steps, cfg.data.train_datasets) == (2e-4, 3, ["general"])
    with pytest.raises(ConfigError) as err:
        load_config(path, AlignmentConfig, ["train.lrr=1e-4", "train.max_steps=many"])
    text = str(err.value)
    assert "with overrides train.lrr=1e-4 train.max_steps=many has 2 problem(s)" in text
    assert "train.lrr" in text and "train.max_steps" in text and "'many'" in text


def test_cli_bad_override_exits_2_naming_it(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump(alignment_config(tmp_path / "manifest", tmp_path / "out")))
    env = {**os.environ, "HILIGHT_PROJECT_ROOT": str(tmp_path)}
    for command in (["train", "-c", str(path), "train.batch_size=big"], ["run", "clipvip_alignment", "-c", str(path),
                                                                        "train.bacth_size=4"]):
        proc = subprocess.run([str(HILIGHT), *command], capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert command[-1].split("=")[0] in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.pipeline
def test_pipeline_records_the_overridden_config(zenml_project, billiards_dir):
    import mlflow

    from pipelines.run import run_pipeline
    from pipelines.stack import mlflow_tracking_uri

    root = zenml_project
    shutil.copytree(billiards_dir, root / "data" / "billiards")
    (root / "config.yaml").write_text(yaml.safe_dump({
        "pipeline": "data_validation", "output_dir": "outputs/dv", "progress": False, "probe": {"workers": 2},
        "datasets": [{"name": "billiards", "root": "data/billiards", "captions": ["captions.json"], "qa": ["qa.json"]}]}))
    run_pipeline("data_validation", root / "config.yaml", overrides=["probe.workers=1", "output_dir=outputs/other"])
    assert (root / "outputs/other/manifest.json").is_file() and not (root / "outputs/dv").exists()
    client = mlflow.MlflowClient(mlflow_tracking_uri())
    (mrun,) = client.search_runs([client.get_experiment_by_name("data_validation").experiment_id])
    assert mrun.data.params["probe.workers"] == "1" and mrun.data.params["output_dir"] == "outputs/other"
