"""HiLight models in MLflow: logged as a pyfunc model (the standalone directory as its artifact), registered as
``hilight-vlm``, promoted with the aliases ``champion`` / ``challenger``, and resolved back to a local directory.

Loading by URI works both ways:

    mlflow.pyfunc.load_model("models:/hilight-vlm@champion").predict(pd.DataFrame({"video": [...], "question": [...]}))
    load_vlm_dir(local_model_dir("models:/hilight-vlm@champion"))   # what ``hilight ask`` does, to stream tokens

Registration is idempotent: a model version is identified by the content digest of its directory (tag
``hilight.model_digest``), so re-running a selection whose models did not change reuses their versions and only
moves the aliases.
"""

from __future__ import annotations

import logging
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from hilight.models.export import META_FILE

log = logging.getLogger(__name__)

ARTIFACT_KEY = "hilight_vlm"
DIGEST_TAG = "hilight.model_digest"
EXAMPLE_QUESTION = "What's happened in this video?"  # the notes' evaluation question (hilight.data.qa)
DATASET_TAG = "hilight.dataset_fingerprint."  # + dataset name: the raw data a registered model was trained on
CHECKED_TAG = "hilight.checked_dataset_fingerprint."  # + dataset name: the data a kept champion was last compared on
SIGNATURE = ModelSignature(inputs=Schema([ColSpec("string", "video"), ColSpec("string", "question")]),
                           outputs=Schema([ColSpec("string", "answer")]))


class HiLightPyfunc(mlflow.pyfunc.PythonModel):
    """``predict`` takes a frame with ``video`` (a file path) and ``question`` columns and returns the answers."""

    def load_context(self, context) -> None:
        from hilight.models.export import load_vlm_dir

        self.bundle = load_vlm_dir(context.artifacts[ARTIFACT_KEY])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list[str]:
        # MlflowException(INVALID_PARAMETER_VALUE): the scoring server answers 400 with this message, not a 500
        missing = [c for c in ("video", "question") if c not in model_input.columns]
        if missing:
            raise MlflowException.invalid_parameter_value(
                f"input lacks columns {missing}; give one row per question with 'video' (a path) and 'question'")
        absent = [str(v) for v in model_input["video"] if not Path(str(v)).is_file()]
        if absent:
            raise MlflowException.invalid_parameter_value(
                f"video file(s) not found on the serving machine: {absent[:5]}; 'video' is a path the model server "
                "can read")
        pix = torch.stack([self.bundle.clip(v) for v in model_input["video"]])
        return self.bundle.generate(model_input["question"].tolist(), pixel_values=pix)


def log_vlm_model(model_dir: str | Path, digest: str, *, name: str = "hilight_vlm",
                  example_video: str | Path | None = None):
    """Log ``model_dir`` as a pyfunc model in the active run; returns MLflow's ``ModelInfo``.

    The model is logged with an input example (one question about ``example_video``, or about a short synthetic
    clip made for the purpose): MLflow stores it with the model, shows it in the UI, and checks at log time that
    the model loads and answers it as a served model would."""
    import peft
    import transformers

    reqs = [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}",
            f"peft=={peft.__version__}", f"mlflow=={mlflow.__version__}", "decord", "safetensors"]
    code = Path(__file__).with_name("pyfunc_model.py")  # models from code: loading unpickles nothing
    with tempfile.TemporaryDirectory(prefix="hilight_example_") as tmp:
        video = example_video or _example_clip(Path(tmp))
        example = pd.DataFrame({"video": [str(video)], "question": [EXAMPLE_QUESTION]})
        return mlflow.pyfunc.log_model(name=name, python_model=str(code), artifacts={ARTIFACT_KEY: str(model_dir)},
                                       signature=SIGNATURE, input_example=example, pip_requirements=reqs,
                                       tags={DIGEST_TAG: digest})


def _example_clip(out_dir: Path) -> Path:
    """One short synthetic billiards clip (enough frames for the 12-frame sampler)."""
    from hilight.data.synth import SynthSettings, generate_dataset

    root = generate_dataset(out_dir / "example", n_videos=1, seed=0, progress=False,
                            settings=SynthSettings(width=64, height=48, fps=8, duration_s=2.0))
    return next((root / "videos").glob("*.mp4"))


def register(model_uri: str, digest: str, model_name: str, tags: dict[str, str]) -> str:
    """The registered version holding ``digest`` (created from ``model_uri`` if there is none); returns its number."""
    client = mlflow.MlflowClient()
    try:
        client.get_registered_model(model_name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(model_name, description="HiLight video-language model (CLIP-ViP + Long-CLIP "
                                       "+ TokenMining + Gemma); aliases champion / challenger set by select_vision_weights")
    for mv in client.search_model_versions(f"name='{model_name}'"):
        if mv.tags.get(DIGEST_TAG) == digest:
            version = mv.version
            break
    else:
        version = mlflow.register_model(model_uri, model_name, tags={DIGEST_TAG: digest}).version
    for k, v in tags.items():
        client.set_model_version_tag(model_name, version, k, v)
    return str(version)


def set_alias(model_name: str, alias: str, version: str | None, reason: str | None = None) -> None:
    """Point ``alias`` at ``version``; ``None`` removes it. With ``reason`` (one or two lines: why this version holds
    the alias), the version's description says so, and a version the alias leaves says until when it held it."""
    client = mlflow.MlflowClient()
    aliases = client.get_registered_model(model_name).aliases
    previous = aliases.get(alias)
    if version is None:
        if alias in aliases:
            client.delete_registered_model_alias(model_name, alias)
    else:
        client.set_registered_model_alias(model_name, alias, version)
    if reason is None:
        return
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if version is not None:
        client.update_model_version(model_name, version, description=f"{alias} since {today}: {reason}")
    if previous is not None and str(previous) != str(version):
        client.update_model_version(model_name, str(previous), description=(
            f"was {alias} until {today}; then " + (f"version {version}: {reason}" if version else f"none: {reason}")))


def local_model_dir(uri: str, cache_dir: str | Path) -> Path:
    """A local HiLight model directory for ``uri`` (``models:/name@alias``, ``models:/name/3``, ``runs:/...``):
    downloaded once into ``cache_dir/<model version or run>``, then reused."""
    client = mlflow.MlflowClient()
    key = uri.replace(":/", "_").replace("/", "_").replace("@", "_")
    if uri.startswith("models:/"):
        name, _, ref = uri[len("models:/"):].partition("@")
        if ref:
            mv = client.get_model_version_by_alias(name, ref)
        else:
            name, _, number = uri[len("models:/"):].partition("/")
            mv = client.get_model_version(name, number)
        key = f"{name}_v{mv.version}_{mv.tags.get(DIGEST_TAG, '')[:12]}"
    target = Path(cache_dir) / key
    found = list(target.rglob(META_FILE)) if target.is_dir() else []
    if not found:
        target.mkdir(parents=True, exist_ok=True)
        mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(target))
        found = list(target.rglob(META_FILE))
    if not found:
        raise FileNotFoundError(f"{uri} holds no HiLight model directory ({META_FILE} not found in {target})")
    return found[0].parent
