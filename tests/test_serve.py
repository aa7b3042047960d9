"""`hilight serve`: the registered champion answers POST /invocations on a loopback port (MLflow's scoring server,
local environment); a request about a video the server cannot read is a 400 with the reason, and the server keeps
serving."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port, tokenmining_config

pytestmark = pytest.mark.pipeline
HILIGHT = Path(sys.executable).with_name("hilight")


def _tiny_vlm_dir(root: Path, manifest: Path, weights: dict) -> Path:
    """A standalone HiLight directory (untrained TokenMining on the tiny towers and LLM), as a merge writes one."""
    from hilight.models.export import GenerationSpec, save_vlm_dir
    from hilight.train.tokenmining import TokenMiningPretrainConfig
    from hilight.train.vlm_parts import build_vlm_parts

    cfg = TokenMiningPretrainConfig.model_validate(tokenmining_config(manifest, root / "s1", weights["clipvip"],
                                                                      weights["llm"]))
    parts = build_vlm_parts(cfg.vision, cfg.llm, cfg.token_mining)
    return save_vlm_dir(parts.vlm, parts.tokenizer, root / "merged", hidden_act="gelu",
                        prompt="What's happened in this video?",
                        generation=GenerationSpec(temperature=0.0, max_new_tokens=4), lineage={"test": "serve"})


def _post(url: str, records: list[dict]) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps({"dataframe_records": records}).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_serve_answers_and_refuses_a_missing_video(zenml_project, caption_manifest, vlm_weights, billiards_dir):
    import mlflow

    from hilight.registry import log_vlm_model, register, set_alias
    from pipelines.stack import configure_zenml, ensure_stack, mlflow_tracking_uri

    root = zenml_project
    configure_zenml()
    ensure_stack()
    mlflow.set_tracking_uri(mlflow_tracking_uri())
    model_dir = _tiny_vlm_dir(root, caption_manifest, vlm_weights)
    video = next((billiards_dir / "videos").glob("*.mp4"))
    with mlflow.start_run(run_name="serve-test"):
        info = log_vlm_model(model_dir, "tiny-serve-test")  # its input example: a synthetic clip made for it
    set_alias("hilight-vlm", "champion", register(info.model_uri, "tiny-serve-test", "hilight-vlm", {}))
    # logged with an input example (MLflow checked at log time that the model answers it)
    assert mlflow.models.Model.load(info.model_uri).saved_input_example_info is not None

    port = free_port()
    server = subprocess.Popen([str(HILIGHT), "serve", "--port", str(port)], cwd=root, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert server.poll() is None, f"server exited: {server.stdout.read()}"
            assert time.monotonic() < deadline, "server not ready in 240 s"
            time.sleep(2)
        status, body = _post(f"{base}/invocations", [{"video": str(video), "question": "What is happening?"}])
        assert status == 200, body
        assert isinstance(body["predictions"], list) and len(body["predictions"]) == 1
        assert isinstance(body["predictions"][0], (str, dict))

        status, body = _post(f"{base}/invocations", [{"video": str(root / "no_such_clip.mp4"), "question": "Hi?"}])
        assert status == 400 and "no_such_clip.mp4" in body["message"] and "not found" in body["message"]
        with urllib.request.urlopen(f"{base}/ping", timeout=5) as r:  # still serving
            assert r.status == 200
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    # bound to loopback only: the printed address is 127.0.0.1
    assert f"serving models:/hilight-vlm@champion on http://127.0.0.1:{port}" in server.stdout.read()
