"""TokenMining: the cross-attention that fuses the two vision towers into the LLM's video tokens.

Queries come from the Long-CLIP frame vectors [B, T, image_dim]; keys and values from the CLIP-ViP token features
[B, S, video_dim]; the attended features go through an output stack to the LLM width. Parameter names are the
reference's (``UniLMProjectors`` in motern88/HiLight), so its ``.bin`` (prefix ``model.token_mining.``) and ``.pt``
files load strictly.

``depth`` selects the three variants the research notes compared (§4.1):

- ``attn_linear``: cross-attention + one linear layer to the LLM width (notes, group 1). T video tokens.
- ``attn_mlp``: cross-attention + two linear layers with ReLU (group 2). T video tokens.
- ``reference``: per-tower projectors first — each Long-CLIP value expanded by ``Linear(1 -> expand)`` + ReLU into
  ``expand`` scalars (T x expand query tokens: 12 x 32 = 384 at real shapes), CLIP-ViP features through
  ``Linear + ReLU`` — then cross-attention + two linear layers with ReLU (group 3). This is the reference code's
  layout: 22 tensors, 6,892,864 parameters at (768, 512, 2048). The default.

The attention is single-head, unmasked, without dropout or residual, over all S keys (CLS and proxies included),
and the output stack ends in ReLU, exactly as in the reference.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from hilight.models.checkpoints import (MODEL_FILE, CheckpointError, load_strict, read_model_config, read_state_dict,
                                        replace_dir, save_model)

Depth = Literal["attn_linear", "attn_mlp", "reference"]
PREFIXES = ("model.token_mining.", "token_mining.")
REFERENCE_FILE = "token_mining.bin"
MODULES = ("LongCLIP_projector", "CLIP_VIP_projector", "query_projector", "key_projector", "val_projector",
           "tokenizer_projector")  # the top-level names of every depth's state dict


class TokenMiningConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    video_dim: int = Field(768, ge=1)  # CLIP-ViP hidden size (keys, values)
    image_dim: int = Field(512, ge=1)  # Long-CLIP projected width (queries); also the attention width
    llm_dim: int = Field(2048, ge=1)  # the LLM's hidden size
    expand: int = Field(32, ge=1)  # reference depth: scalars per Long-CLIP value (query tokens per frame)
    depth: Depth = "reference"

    def num_tokens(self, num_frames: int) -> int:
        """Video tokens the LLM receives per clip."""
        return num_frames * self.expand if self.depth == "reference" else num_frames


class TokenMining(nn.Module):
    def __init__(self, config: TokenMiningConfig):
        super().__init__()
        self.config = config
        d_img, d_vid, d_llm = config.image_dim, config.video_dim, config.llm_dim
        if config.image_dim % config.expand and config.depth == "reference":
            raise ValueError(f"image_dim {d_img} must be a multiple of expand {config.expand}")
        if config.depth == "reference":
            self.LongCLIP_projector = nn.Sequential(nn.Linear(1, config.expand), nn.ReLU())
            self.CLIP_VIP_projector = nn.Sequential(nn.Linear(d_vid, d_vid), nn.ReLU())
        self.query_projector = nn.Sequential(nn.LayerNorm(d_img), nn.Linear(d_img, d_img))
        self.key_projector = nn.Sequential(nn.LayerNorm(d_vid), nn.Linear(d_vid, d_img))
        self.val_projector = nn.Sequential(nn.LayerNorm(d_vid), nn.Linear(d_vid, d_img))
        if config.depth == "attn_linear":
            self.tokenizer_projector = nn.Sequential(nn.LayerNorm(d_img), nn.Linear(d_img, d_llm))
        else:
            self.tokenizer_projector = nn.Sequential(nn.LayerNorm(d_img), nn.Linear(d_img, d_llm), nn.ReLU(),
                                                     nn.Linear(d_llm, d_llm), nn.ReLU())
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference's init: xavier-uniform Linear weights, zero biases, unit LayerNorms."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def queries(self, frames: torch.Tensor) -> torch.Tensor:
        """[B, T, image_dim] Long-CLIP frame vectors -> [B, Q, image_dim] query tokens (before the projector)."""
        if self.config.depth != "reference":
            return frames
        b, t, d = frames.shape
        e = self.config.expand
        # the reference's memory reinterpretation (not a permute): query token j of frame n is built from
        # dims [j*d/e, (j+1)*d/e) of that frame, each expanded to e scalars
        expanded = self.LongCLIP_projector(frames.reshape(b * t * d, 1))  # [B*T*d, e]
        return expanded.view(b, t, e, d).reshape(b, t * e, d)

    def forward(self, video_features: torch.Tensor, frame_features: torch.Tensor) -> torch.Tensor:
        """``video_features`` [B, S, video_dim] (CLIP-ViP last hidden states), ``frame_features`` [B, T, image_dim]
        (Long-CLIP projected frame vectors) -> [B, num_tokens(T), llm_dim] video tokens."""
        probs, v = self._attend(video_features, frame_features)
        return self.tokenizer_projector(probs @ self.val_projector(v))

    def attention(self, video_features: torch.Tensor, frame_features: torch.Tensor) -> torch.Tensor:
        """[B, num_tokens(T), S]: each query token's attention over the S CLIP-ViP tokens, as ``forward`` pools."""
        return self._attend(video_features, frame_features)[0]

    def _attend(self, video_features: torch.Tensor, frame_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if video_features.dim() != 3 or video_features.shape[-1] != self.config.video_dim:
            raise ValueError(f"video_features must be [B, S, {self.config.video_dim}], got {tuple(video_features.shape)}")
        if frame_features.dim() != 3 or frame_features.shape[-1] != self.config.image_dim:
            raise ValueError(f"frame_features must be [B, T, {self.config.image_dim}], got {tuple(frame_features.shape)}")
        v = self.CLIP_VIP_projector(video_features) if self.config.depth == "reference" else video_features
        q = self.query_projector(self.queries(frame_features))
        k = self.key_projector(v)
        # hand-written rather than F.scaled_dot_product_attention: the reference applies nan_to_num to the scores
        # before the softmax, and its checkpoints were trained with that
        scores = torch.nan_to_num(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]))
        return scores.softmax(-1), v


def token_mining_state_dict(sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Strip the reference's optional prefix (``model.token_mining.`` in ``.bin``, none in ``.pt``); every key
    must carry the same prefix."""
    for prefix in PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            other = [k for k in sd if not k.startswith(prefix)]
            if other:
                raise CheckpointError(f"{source} mixes {prefix!r} keys with unprefixed keys ({other[:3]}); "
                                      "it is not a TokenMining file")
            return {k[len(prefix):]: v for k, v in sd.items()}
    foreign = sorted({_prefix_before_modules(k) for k in sd if k.split(".", 1)[0] not in MODULES})
    if foreign:
        raise CheckpointError(f"{source} has keys under the unknown prefix(es) {foreign[:3]} (e.g. "
                              f"{next(iter(sd))!r}); a TokenMining file holds {', '.join(MODULES)} weights, bare or "
                              f"under one of {list(PREFIXES)}: re-save it with those names, or point at the "
                              "TokenMining file itself")
    return dict(sd)


def _prefix_before_modules(key: str) -> str:
    """The part of ``key`` before its first TokenMining module name (the whole key when it has none)."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part in MODULES:
            return ".".join(parts[:i]) + "."
    return key


def detect_depth(sd: dict[str, torch.Tensor]) -> Depth:
    """The layout a (prefix-stripped) TokenMining state dict was saved from."""
    if "LongCLIP_projector.0.weight" in sd:
        return "reference"
    return "attn_mlp" if "tokenizer_projector.3.weight" in sd else "attn_linear"


def load_token_mining(model: TokenMining, path) -> None:
    """Load a reference ``.bin`` / ``.pt`` or one of our safetensors files strictly into ``model`` (a missing,
    unexpected or mis-shaped key fails and is named; fp16 files are cast to the model's dtype)."""
    path = Path(path)
    if path.is_dir():  # a directory written by save_token_mining, or the reference's stage-1 output folder
        path = path / MODEL_FILE if (path / MODEL_FILE).is_file() or not (path / REFERENCE_FILE).is_file() \
            else path / REFERENCE_FILE
    sd = token_mining_state_dict(read_state_dict(path), str(path))
    found = detect_depth(sd)
    if found != model.config.depth:
        raise CheckpointError(f"{path} holds a TokenMining of depth {found!r} but the model is {model.config.depth!r}; "
                              f"set token_mining.depth: {found}")
    load_strict(model, sd, str(path))


def save_token_mining(model: TokenMining, out_dir, meta: dict) -> Path:
    """A standalone TokenMining directory: ``model.safetensors`` + ``config.json`` (architecture + provenance) +
    ``token_mining.bin``, the reference's layout (``model.token_mining.`` keys, ``torch.save``) for its scripts."""
    with replace_dir(out_dir) as tmp:
        save_model(model, tmp, {"family": "token_mining", "token_mining": model.config.model_dump(), **meta})
        torch.save({f"{PREFIXES[0]}{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                   tmp / REFERENCE_FILE)
    return Path(out_dir)


def load_saved_token_mining(model_dir) -> TokenMining:
    """A ``TokenMining`` from a directory written by ``save_token_mining``."""
    config = read_model_config(model_dir)
    if config.get("family") != "token_mining":
        raise CheckpointError(f"{model_dir} is not a TokenMining export (family {config.get('family')!r})")
    model = TokenMining(TokenMiningConfig.model_validate(config["token_mining"]))
    load_token_mining(model, model_dir)
    return model
