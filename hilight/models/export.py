"""The standalone HiLight model directory (what the merge step writes, MLflow stores and ``hilight ask`` loads):

    hilight.json          format, frame settings, video-token count, Gemma activation, prompt, decoding defaults,
                          the digest of every part's weights, lineage
    llm/                  the merged Gemma: transformers ``save_pretrained`` (config.json, safetensors,
                          generation_config.json) + the tokenizer, loadable by plain transformers
    token_mining/         TokenMining (safetensors + config.json + the reference's token_mining.bin)
    vision/clipvip/       the CLIP-ViP candidate's vision tower (model.safetensors + config.json)
    vision/longclip/      Long-CLIP's vision tower (transformers ``CLIPVisionModelWithProjection``)

The reference's merged directory held only Gemma + TokenMining and re-read the towers from hard-coded paths
(hilight-reference §5.1); here every weight the model computes with is inside, and loading checks each part's
digest against ``hilight.json``, so a directory that was tampered with or half-copied fails loudly.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import save_file

from hilight.data.conversations import Turn, encode_prompt
from hilight.data.frames import load_clip_frames
from hilight.models.checkpoints import (
    CheckpointError,
    load_clipvip_weights,
    module_digest,
    read_model_config,
    replace_dir,
)
from hilight.models.clipvip import CLIPViPConfig, CLIPViPModel, build_clipvip
from hilight.models.longclip import LongCLIPImageTower
from hilight.models.token_mining import load_saved_token_mining, save_token_mining
from hilight.models.tokenizers import load_llm_tokenizer
from hilight.models.vlm import HiLightVLM, load_llm

log = logging.getLogger(__name__)

FORMAT = "hilight-vlm"
META_FILE = "hilight.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class GenerationSpec(BaseModel):
    """Decoding settings (research notes §6: temperature 0.1, 128 new tokens; sampling when temperature > 0)."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(0.1, ge=0)
    max_new_tokens: int = Field(128, ge=1)
    top_p: float = Field(1.0, gt=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    seed: int = 42  # sampling is seeded per call, so the same prompt and settings give the same answer

    def kwargs(self, tokenizer) -> dict:
        stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")]
        out = {"max_new_tokens": self.max_new_tokens, "do_sample": self.temperature > 0,
               "repetition_penalty": self.repetition_penalty, "eos_token_id": stops,
               "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id}
        if self.temperature > 0:
            out.update(temperature=self.temperature, top_p=self.top_p, top_k=None)
        return out


def part_digests(vlm: HiLightVLM) -> dict[str, str]:
    return {"llm": module_digest(vlm.llm), "token_mining": module_digest(vlm.token_mining),
            "clipvip": module_digest(vlm.clipvip.vision_state_dict()), "longclip": module_digest(vlm.longclip)}


def save_vlm_dir(vlm: HiLightVLM, tokenizer, out_dir: str | Path, *, hidden_act: str, prompt: str,
                 generation: GenerationSpec, lineage: dict) -> Path:
    """Write the directory described in the module docstring, atomically; returns ``out_dir``."""
    if vlm.clipvip is None or vlm.longclip is None:
        raise ValueError("a standalone model needs both vision towers; rebuild the VLM with them before saving")
    out_dir = Path(out_dir)
    cv = vlm.clipvip
    meta = {"format": FORMAT, "version": 1, "num_frames": cv.config.num_frames,
            "image_size": cv.config.vision.image_size,
            "video_tokens": vlm.token_mining.config.num_tokens(cv.config.num_frames),
            "hidden_act": hidden_act, "dtype": str(next(vlm.llm.parameters()).dtype).removeprefix("torch."),
            "prompt": prompt, "generation": generation.model_dump(), "digests": part_digests(vlm), "lineage": lineage}
    with replace_dir(out_dir) as tmp:
        vlm.llm.save_pretrained(str(tmp / "llm"))
        tokenizer.save_pretrained(str(tmp / "llm"))
        save_token_mining(vlm.token_mining, tmp / "token_mining", {"lineage": lineage})
        clip_dir = tmp / "vision" / "clipvip"
        clip_dir.mkdir(parents=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in cv.vision_state_dict().items()},
                  clip_dir / "model.safetensors")
        (clip_dir / "config.json").write_text(json.dumps({"model": cv.config.model_dump(mode="json"), "part": "vision"},
                                                         indent=1))
        vlm.longclip.model.save_pretrained(str(tmp / "vision" / "longclip"))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
    return out_dir


def read_meta(model_dir: str | Path) -> dict:
    path = Path(model_dir) / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{model_dir} is not a HiLight model directory ({META_FILE} is missing); point at the "
                              "merge step's output (e.g. outputs/selection/<candidate>/merged) or a registered model")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


@dataclass
class VLMBundle:
    """A loaded HiLight model with what it needs to answer: tokenizer, frame settings, prompt and decoding."""

    vlm: HiLightVLM
    tokenizer: object
    meta: dict

    @property
    def num_frames(self) -> int:
        return self.meta["num_frames"]

    @property
    def image_size(self) -> int:
        return self.meta["image_size"]

    @property
    def video_tokens(self) -> int:
        return self.meta["video_tokens"]

    @property
    def generation(self) -> GenerationSpec:
        return GenerationSpec.model_validate(self.meta["generation"])

    def clip(self, video_file: str | Path) -> torch.Tensor:
        """``[T, 3, S, S]`` model input of a video file (the training frame pipeline)."""
        return load_clip_frames(video_file, self.num_frames, self.image_size)

    @torch.no_grad()
    def generate(self, questions: Sequence[str], *, pixel_values: torch.Tensor | None = None,
                 video_tokens: torch.Tensor | None = None, generation: GenerationSpec | None = None,
                 histories: Sequence[Sequence[Turn]] | None = None, streamer=None) -> list[str]:
        """Answers to ``questions``, one video each (``pixel_values [B, T, 3, S, S]`` or ready ``video_tokens``),
        prompted with the training chat template, after each question's earlier turns (``histories``) if any."""
        generation = generation or self.generation
        histories = histories or [()] * len(questions)
        ids = [torch.tensor(encode_prompt(q, self.tokenizer, video_tokens=self.video_tokens, history=list(h)).input_ids)
               for q, h in zip(questions, histories, strict=True)]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for i, x in enumerate(ids):
            input_ids[i, :len(x)], mask[i, :len(x)] = x, 1
        device = next(self.vlm.llm.parameters()).device
        if video_tokens is None:
            video_tokens = self.vlm.token_mining(*self.vlm.tower_features(pixel_values.to(device)))
        torch.manual_seed(generation.seed)
        out = self.vlm.generate(input_ids.to(device), mask.to(device), video_tokens=video_tokens.to(device),
                                streamer=streamer, **generation.kwargs(self.tokenizer))
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]


def default_device() -> torch.device:
    """Where inference runs unless told: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_vlm_dir(model_dir: str | Path, *, dtype: str | None = None, verify: bool = True,
                 device: str | torch.device | None = None) -> VLMBundle:
    """Load a directory written by ``save_vlm_dir``, strictly, onto ``device`` (default: ``default_device()``);
    ``verify`` checks every part's digest. The LLM keeps the saved dtype unless ``dtype`` is given."""
    model_dir = Path(model_dir)
    meta = read_meta(model_dir)
    llm = load_llm(model_dir / "llm", hidden_act=meta["hidden_act"], dtype=DTYPES[dtype or meta["dtype"]])
    tokenizer = load_llm_tokenizer(model_dir / "llm")
    token_mining = load_saved_token_mining(model_dir / "token_mining")
    cv_cfg = read_model_config(model_dir / "vision" / "clipvip")
    clipvip: CLIPViPModel = build_clipvip(CLIPViPConfig.model_validate(cv_cfg["model"]))
    load_clipvip_weights(clipvip, model_dir / "vision" / "clipvip", part="vision")
    clipvip.text_model = None
    longclip = LongCLIPImageTower.from_saved(model_dir / "vision" / "longclip")
    vlm = HiLightVLM(llm, token_mining, clipvip, longclip).eval()
    if verify:
        found = part_digests(vlm)
        if dtype not in (None, meta["dtype"]):
            found.pop("llm")  # converted weights hash differently
        bad = [k for k, v in found.items() if meta["digests"].get(k) != v]
        if bad:
            raise CheckpointError(f"{model_dir}: the weights of {bad} differ from the digests in {META_FILE}; the "
                                  "directory was modified or partly copied; re-run the merge step")
    return VLMBundle(vlm.to(torch.device(device) if device is not None else default_device()), tokenizer, meta)
