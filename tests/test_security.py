"""Security defaults: pickle only through torch.load(weights_only=True), servers on 127.0.0.1 unless told
otherwise, data paths confined to their dataset roots."""

from __future__ import annotations

import ast
import os
import subprocess

import pytest
import torch

from tests.conftest import REPO

SOURCES = [p for d in ("hilight", "steps", "pipelines") for p in (REPO / d).rglob("*.py")]


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            yield node, (f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")), \
                (ast.unparse(f.value) if isinstance(f, ast.Attribute) else "")


def test_no_unpickling_except_torch_load_weights_only():
    offenders = []
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        for node, name, owner in _calls(tree):
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            if name in ("load", "loads") and owner in ("pickle", "cloudpickle", "dill", "joblib"):
                offenders.append(f"{where} {owner}.{name}")
            if name == "load" and owner == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                    offenders.append(f"{where} torch.load without weights_only=True")
            if name == "read_pickle":
                offenders.append(f"{where} pandas.read_pickle")
    assert not offenders, offenders


def test_a_malicious_legacy_checkpoint_is_refused_without_running_code(tmp_path):
    from hilight.models.checkpoints import CheckpointError, read_state_dict

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "model.pt"
    torch.save({"weight": torch.zeros(2), "payload": Exploit()}, path)
    with pytest.raises(CheckpointError, match="model.pt"):
        read_state_dict(path)
    assert not marker.exists()


def test_the_registered_model_loads_from_code_not_from_a_pickle():
    from hilight.registry import log_vlm_model

    source = (REPO / "hilight" / "registry.py").read_text()
    assert "python_model=str(code)" in source and "pyfunc_model.py" in source
    assert "set_model(HiLightPyfunc())" in (REPO / "hilight" / "pyfunc_model.py").read_text()
    assert callable(log_vlm_model)


def test_ui_binds_to_localhost_by_default(monkeypatch, zenml_project):
    from typer.testing import CliRunner

    from hilight.cli import app

    seen = []

    real_popen = subprocess.Popen

    class Server:  # the server `hilight ui` starts, ended at once
        pid = 0

        def poll(self):
            return 0

    def popen(cmd, *args, **kwargs):
        if "server" not in cmd:
            return real_popen(cmd, *args, **kwargs)
        seen.append(cmd)
        return Server()

    monkeypatch.setattr(subprocess, "Popen", popen)
    assert CliRunner().invoke(app, ["ui", "--port", "5999"]).exit_code == 0
    cmd = seen[-1]
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "5999"
    assert CliRunner().invoke(app, ["ui", "--host", "0.0.0.0"]).exit_code == 0  # only when told
    assert seen[-1][seen[-1].index("--host") + 1] == "0.0.0.0"


def test_ui_with_a_remote_tracking_server_starts_nothing(monkeypatch, zenml_project):
    """A remote tracker's URI is a server, not a backend store: `hilight ui` points at it instead of handing
    `mlflow server --backend-store-uri http://...` a URI it cannot serve."""
    from typer.testing import CliRunner

    import pipelines.stack
    from hilight.cli import app

    monkeypatch.setattr(pipelines.stack, "mlflow_tracking_uri", lambda: "https://mlflow.example.org")
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail(f"started a process: {a}"))
    result = CliRunner().invoke(app, ["ui", "--port", "5998"])
    assert result.exit_code == 0, result.output
    assert "https://mlflow.example.org" in result.output and "nothing started" in result.output


@pytest.mark.parametrize("ref, reason", [("../../outside.mp4", "contains '..'"), ("/etc/passwd", "absolute path"),
                                         ("videos/../../outside.mp4", "contains '..'"),
                                         ("link.mp4", "outside the data root")])
def test_video_references_outside_the_dataset_root_are_rejected(dataset_copy, ref, reason):
    from hilight.data.probe import resolve_video_path

    outside = dataset_copy.parent / "outside.mp4"
    outside.write_bytes(b"x")
    (dataset_copy / "videos" / "link.mp4").symlink_to(outside)
    path, error = resolve_video_path(dataset_copy, "videos", ref)
    assert path is None and reason in error


def test_config_paths_cannot_climb_out_of_a_dataset_root():
    from pydantic import ValidationError

    from hilight.data.ingest import DataValidationConfig

    with pytest.raises(ValidationError, match="without '..'"):
        DataValidationConfig.model_validate({"datasets": [{"name": "a", "root": "r", "captions": ["../x.json"]}]})
    with pytest.raises(ValidationError, match="video_dir"):
        DataValidationConfig.model_validate({"datasets": [{"name": "a", "root": "r", "captions": ["c.json"],
                                                           "video_dir": "../videos"}]})
