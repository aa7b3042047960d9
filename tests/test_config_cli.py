"""Every shipped config validates; config errors are reported all at once; the CLI is usable."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from hilight.cli import app
from hilight.config import ConfigError, import_object, load_config
from pipelines import PIPELINES
from tests.conftest import REPO


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    import yaml

    raw = yaml.safe_load(path.read_text())
    header = path.read_text().split("\n\n")[0]
    assert header.startswith("#") and ("hilight run" in header or "hilight retrain" in header), "header gives the command"
    models = {**{k: v[1] for k, v in PIPELINES.items()}, "retrain": "hilight.retrain:RetrainConfig"}
    load_config(path, import_object(models[raw["pipeline"]]))


def test_config_errors_are_all_reported(tmp_path):
    from hilight.data.ingest import DataValidationConfig

    bad = tmp_path / "bad.yaml"
    bad.write_text("pipeline: data_validation\ndatasets: [{name: 'a b', root: r, captions: ['../x.json']}]\nprobe: {workers: 0}\ntypo: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad, DataValidationConfig)
    msg = str(err.value)
    assert "4 problem(s)" in msg
    for key in ("datasets.0.name", "datasets.0.captions", "probe.workers", "typo"):
        assert key in msg


@pytest.mark.parametrize("cmd", [[], ["data", "synth"], ["validate"], ["run"], ["demo"], ["ui"], ["stack"], ["train"], ["ask"], ["retrain"]])
def test_help(cmd):
    result = CliRunner().invoke(app, [*cmd, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_cli_synth_writes_dataset(tmp_path):
    out = tmp_path / "d"
    result = CliRunner().invoke(app, ["data", "synth", "--out", str(out), "--videos", "2", "--seed", "1", "--domain", "general",
                                      "--width", "64", "--height", "48", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "videos").iterdir()) == ["gen1_00000.mp4", "gen1_00001.mp4"]


def test_train_dispatches_on_the_config_pipeline(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("pipeline: alignment_ablation\n")
    result = CliRunner().invoke(app, ["train", "-c", str(cfg)])
    assert result.exit_code == 2 and "use `hilight run alignment_ablation" in result.output


def test_a_bad_config_is_a_message_and_exit_2_not_a_traceback(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("pipeline: retrain\nwatchh: [x]\n")
    done = subprocess.run([sys.executable, "-m", "hilight.cli", "retrain", "-c", str(bad)], capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "watchh: unknown key `watchh`; did you mean `watch`?" in done.stderr
