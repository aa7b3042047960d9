"""Against a real `mlflow server` (SQLite database backend, 127.0.0.1, a free port): a pipeline's run shows its
metrics and artifacts in the MLflow UI rendered by headless Chromium (a screenshot is kept in test-artifacts/), and
killing the server mid-training and restarting it loses no metric and does not stop the training."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, free_port, llm_pretrain_config

pytestmark = pytest.mark.pipeline
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--window-size=1400,1000", "--virtual-time-budget=20000"]


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a SQLite database; ``kill`` (SIGKILL) and ``start`` again keep the data."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> MlflowServer:
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--default-artifact-root", (self.root / "artifacts").as_uri(), "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(self.root / "server.log", "ab"),
                                     start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not come up on {self.url}: {(self.root / 'server.log').read_text()[-2000:]}")

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its gunicorn/uvicorn workers
        self.proc.wait()


@pytest.fixture
def server(tmp_path):
    s = MlflowServer(tmp_path).start()
    yield s
    if s.proc.poll() is None:
        s.kill()


def _point_stack_at(project: Path, url: str) -> None:
    recipe = yaml.safe_load((project / ".zenml" / "stack.yaml").read_text())
    recipe["stack"] = "hilight_server"
    recipe["components"]["experiment_tracker"] = {"name": "hilight_mlflow_server", "flavor": "mlflow",
                                                  "config": {"tracking_uri": url, "tracking_token": "unused"}}
    (project / ".zenml" / "stack.yaml").write_text(yaml.safe_dump(recipe))


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed here if missing (needs root and apt)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found and shutil.which("apt-get") and os.geteuid() == 0:
        install = ["apt-get", "install", "-y", "-q", "chromium"]
        if subprocess.run(install, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True)
            subprocess.run(install, capture_output=True)
        found = shutil.which("chromium")
    if not found:
        pytest.skip("chromium is not installed and cannot be installed here (apt-get install chromium as root)")
    return found


def _page(chromium: str, url: str, *extra: str) -> str:
    done = subprocess.run([chromium, *CHROMIUM_FLAGS, *extra, url], capture_output=True, text=True, timeout=120)
    return done.stdout


def _run_llm_pipeline(project: Path, manifest: Path, **train) -> subprocess.Popen:
    cfg = project / "llm.yaml"
    cfg.write_text("# hilight run llm_pretrain -c llm.yaml\n"
                   + yaml.safe_dump(llm_pretrain_config(manifest, project / "outputs" / "llm", **train)))
    env = {**os.environ, "HILIGHT_PROJECT_ROOT": str(project), "ZENML_CONFIG_PATH": str(project / ".zenml"),
           "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "hilight.cli", "run", "llm_pretrain", "-c", str(cfg)], cwd=project,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_pipeline_run_is_visible_in_the_mlflow_ui(server, zenml_project, caption_manifest, chromium):
    import mlflow

    _point_stack_at(zenml_project, server.url)
    proc = _run_llm_pipeline(zenml_project, caption_manifest, max_steps=10, val_every=5, ckpt_every=5)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    client = mlflow.MlflowClient(server.url)
    exp = client.get_experiment_by_name("llm_pretrain")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.metrics["heldout/lm_loss"] < run.data.metrics["heldout/lm_loss_untrained"]

    page = f"{server.url}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}"
    dom = _page(chromium, page, "--dump-dom")
    for text in (run.info.run_name, "heldout/lm_loss", "train/lm_loss", f"{run.data.metrics['heldout/lm_loss']:.4g}"[:4]):
        assert text in dom, f"{text!r} not on the run page"
    assert ">model<" in _page(chromium, page + "/artifacts", "--dump-dom")  # the exported model folder
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "mlflow_run_page.png"
    _page(chromium, page, f"--screenshot={shot}")
    assert shot.is_file() and shot.stat().st_size > 10_000


def test_killing_the_server_mid_training_loses_no_metric(server, zenml_project, caption_manifest):
    import mlflow

    _point_stack_at(zenml_project, server.url)
    steps = 400
    proc = _run_llm_pipeline(zenml_project, caption_manifest, max_steps=steps, val_every=100, ckpt_every=100)
    client = mlflow.MlflowClient(server.url)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # wait until training is logging, then pull the plug
        exp = client.get_experiment_by_name("llm_pretrain")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        if runs and client.get_metric_history(runs[0].info.run_id, "train/lm_loss"):
            break
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.5)
    server.kill()
    killed_at = time.monotonic()
    time.sleep(5)
    assert proc.poll() is None, "training stopped when the tracking server died"
    server.start()
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    run = client.search_runs([client.get_experiment_by_name("llm_pretrain").experiment_id])[0]
    history = client.get_metric_history(run.info.run_id, "train/lm_loss")
    assert sorted(m.step for m in history) == list(range(1, steps + 1)), "train metrics were lost in the outage"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/lm_loss")] == [0, 100, 200, 300, 400]
    print(f"server down for {time.monotonic() - killed_at:.0f}s+; {len(history)} of {steps} train/lm_loss points kept")
