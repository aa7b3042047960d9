"""CLIP-ViP: a CLIP video tower with video proxy tokens and proxy-guided attention.

Follows microsoft/XPretrain CLIP-ViP (`CLIP_ViP.py`, `VidCLIP.py`; Xue et al., ICLR 2023) as summarised in
``docs/reference/clipvip-sparc-longclip.md`` §1. Reading order: the model (``CLIPViPModel``) → the vision
transformer (``ViPVisionTransformer``) → its attention (``ViPAttention``) → the embeddings.

Parameter names equal the original ones after its ``clipmodel.`` prefix, so released checkpoints load 1:1
(``hilight.models.checkpoints``). The text tower is transformers' ``CLIPTextModel``; the vision tower is ours,
built from transformers' ``CLIPMLP``, because its attention pattern and token layout differ from ViT's.

Token layout of one video, T frames of (image_size / patch_size)² = L patches, M = 1 + add_cls_num proxies::

    [CLS, proxy_1 .. proxy_{M-1}, frame_0 patches (L), ..., frame_{T-1} patches (L)]   -> M + T·L tokens

ViP-B/16 at 12 frames of 224 px: 4 + 12·196 = 2356 tokens.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import CLIPTextConfig, CLIPTextModel
from transformers.models.clip.modeling_clip import CLIPMLP

from hilight.config import deep_merge

PRESET_DIR = Path(__file__).parent / "presets" / "clipvip"
LOGIT_SCALE_MAX = math.log(200.0)  # CLIP-ViP clamps logit_scale to [0, ln 200] after every optimizer step


class ViPVisionConfig(BaseModel):
    """Vision tower shape; defaults are ViP-B/16."""

    model_config = ConfigDict(extra="forbid")

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    temporal_size: int = Field(12, ge=1)  # rows of the learned temporal table
    add_cls_num: int = Field(3, ge=0)  # extra video proxies besides CLS
    use_temporal_embed: bool = True

    @model_validator(mode="after")
    def _check(self) -> ViPVisionConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        return self

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_proxies(self) -> int:
        return 1 + self.add_cls_num


class CLIPTextSettings(BaseModel):
    """Text tower shape (turned into a transformers ``CLIPTextConfig``); defaults are CLIP B/16."""

    model_config = ConfigDict(extra="forbid")

    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    vocab_size: int = 49408
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    bos_token_id: int = 49406
    eos_token_id: int = 49407  # pooling takes the first EOS; pad equals EOS in CLIP's tokenizer

    def to_hf(self) -> CLIPTextConfig:
        return CLIPTextConfig(**self.model_dump(), pad_token_id=self.eos_token_id)


class CLIPViPConfig(BaseModel):
    """The whole model. Presets live in ``presets/clipvip/*.json``; see ``load_preset``."""

    model_config = ConfigDict(extra="forbid")

    vision: ViPVisionConfig = Field(default_factory=ViPVisionConfig)
    text: CLIPTextSettings = Field(default_factory=CLIPTextSettings)
    projection_dim: int = 512
    num_frames: int = Field(12, ge=1)  # frames sampled per clip
    logit_scale_init: float = 4.6  # exp(4.6) ≈ 99.5, CLIP-ViP's value (not HF's 2.6592)

    @property
    def seq_len(self) -> int:
        """Vision tokens per clip: M proxies + T·L patches (2356 for ViP-B/16)."""
        return self.vision.num_proxies + self.num_frames * self.vision.num_patches


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name: str, overrides: dict | None = None) -> CLIPViPConfig:
    """A named preset (``clipvip-b16``, ``tiny``), optionally with nested overrides."""
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown CLIP-ViP preset {name!r}; available: {preset_names()}")
    raw = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    return CLIPViPConfig.model_validate(deep_merge(raw, overrides or {}))


# ----------------------------------------------------------------------------------------------- outputs


@dataclass
class VisionOutput:
    last_hidden_state: torch.Tensor  # [B, S, Dv], not post-layernormed (as in CLIP-ViP)
    pooled: torch.Tensor  # [B, Dv] = post_layernorm(last_hidden_state[:, 0])
    hidden_states: tuple[torch.Tensor, ...] | None = None  # n_layers + 1 tensors [B, S, Dv]; 0 = after pre_layrnorm
    proxy_attentions: tuple[torch.Tensor, ...] | None = None  # per layer [B, H, M, S]: proxy queries over all keys


@dataclass
class TextOutput:
    last_hidden_state: torch.Tensor  # [B, L, Dt], after final_layer_norm
    pooled: torch.Tensor  # [B, Dt], the first EOS position
    hidden_states: tuple[torch.Tensor, ...] | None = None  # n_layers + 1 tensors [B, L, Dt], before final_layer_norm


# ----------------------------------------------------------------------------------------------- model


@dataclass
class AlignmentOutput:
    """What the alignment objective needs from one forward pass; one row per caption."""

    video_embeds: torch.Tensor  # [B, P] unit vectors of each caption's video
    text_embeds: torch.Tensor  # [B, P] unit vectors of the captions
    scale: torch.Tensor  # exp(logit_scale), clamped
    video_tokens: list[torch.Tensor]  # per requested depth: [B, S', P] projected patch tokens of each caption's video
    text_tokens: list[torch.Tensor]  # per requested depth: [B, L, P] projected caption tokens



class CLIPViPModel(nn.Module):
    """Video tower + text tower + projections + learnable temperature.

    ``encode_video`` / ``encode_text`` return tower outputs; ``video_embeds`` / ``text_embeds`` turn them into
    L2-normalised joint-space vectors; ``video_tokens`` / ``text_tokens`` project every token the same way
    (used by the SPARC local loss, FILIP-style: no extra parameters)."""

    def __init__(self, config: CLIPViPConfig):
        super().__init__()
        self.config = config
        self.vision_model = ViPVisionTransformer(config.vision)
        self.text_model = CLIPTextModel(config.text.to_hf())
        self.visual_projection = nn.Linear(config.vision.hidden_size, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(config.text.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init))
        nn.init.normal_(self.visual_projection.weight, std=config.vision.hidden_size**-0.5)
        nn.init.normal_(self.text_projection.weight, std=config.text.hidden_size**-0.5)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                video_index: torch.Tensor | None = None, token_layers: list[tuple[int, int]] | None = None,
                skip_video_tokens: int = 0) -> AlignmentOutput:
        """The training forward: ``pixel_values`` [Bv, T, 3, H, W], captions [B, L], ``video_index`` [B] (each
        caption's row in ``pixel_values``; default one caption per video). ``token_layers`` lists (vision layer,
        text layer) pairs whose tokens are projected into the joint space for a fine-grained loss (hidden-state
        indices, 0 = embeddings); the first ``skip_video_tokens`` vision tokens (CLS + proxies) are left out.

        Everything a loss needs comes out of this call, so DDP (and FSDP, ``torch.compile``) see every parameter
        used in ``forward``."""
        n_v, n_t = self.config.vision.num_hidden_layers, self.config.text.num_hidden_layers
        layers = token_layers or []
        deep = any(pair != (n_v, n_t) for pair in layers)  # the last layers need no hidden_states
        vision = self.encode_video(pixel_values, output_hidden_states=deep)
        text = self.encode_text(input_ids, attention_mask, output_hidden_states=deep)
        idx = torch.arange(len(pixel_values), device=pixel_values.device) if video_index is None else video_index
        video_tokens, text_tokens = [], []
        for v_i, t_i in layers:
            v_h = vision.hidden_states[v_i] if deep else vision.last_hidden_state
            t_h = text.hidden_states[t_i] if deep else text.last_hidden_state
            video_tokens.append(self.video_tokens(v_h[:, skip_video_tokens:])[idx])
            text_tokens.append(self.text_tokens(t_h, final_norm=deep))
        return AlignmentOutput(self.video_embeds(vision)[idx], self.text_embeds(text), self.scale(), video_tokens,
                               text_tokens)

    def encode_video(self, pixel_values: torch.Tensor, *, output_hidden_states: bool = False,
                     output_proxy_attentions: bool = False) -> VisionOutput:
        """``pixel_values`` [B, T, 3, H, W], CLIP-normalised."""
        return self.vision_model(pixel_values, output_hidden_states=output_hidden_states,
                                 output_proxy_attentions=output_proxy_attentions)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                    output_hidden_states: bool = False) -> TextOutput:
        """``input_ids``/``attention_mask`` [B, L]; the mask comes from the tokenizer (pad equals EOS in CLIP)."""
        out = self.text_model(input_ids=input_ids, attention_mask=attention_mask,
                              output_hidden_states=output_hidden_states)
        return TextOutput(out.last_hidden_state, out.pooler_output, out.hidden_states if output_hidden_states else None)

    def video_embeds(self, out: VisionOutput) -> torch.Tensor:
        """[B, P] unit vectors from the pooled CLS proxy."""
        return F.normalize(self.visual_projection(out.pooled), dim=-1)

    def text_embeds(self, out: TextOutput) -> torch.Tensor:
        """[B, P] unit vectors from the EOS token."""
        return F.normalize(self.text_projection(out.pooled), dim=-1)

    def video_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, S, Dv] hidden states → [B, S, P] through post_layernorm + visual_projection, token-wise."""
        return self.visual_projection(self.vision_model.post_layernorm(hidden))

    def text_tokens(self, hidden: torch.Tensor, *, final_norm: bool = True) -> torch.Tensor:
        """[B, L, Dt] hidden states → [B, L, P] through final_layer_norm (unless already applied) + text_projection."""
        if final_norm:
            hidden = self.text_model.final_layer_norm(hidden)
        return self.text_projection(hidden)

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), with logit_scale clamped to [0, ln 200] as CLIP-ViP does."""
        return self.logit_scale.clamp(0.0, LOGIT_SCALE_MAX).exp()

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Called after every optimizer step (XP ``run_video_retrieval.py`` clamps in place)."""
        self.logit_scale.clamp_(0.0, LOGIT_SCALE_MAX)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.vision_model.gradient_checkpointing = enabled
        if enabled:
            self.text_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.text_model.gradient_checkpointing_disable()

    def vision_state_dict(self) -> dict[str, torch.Tensor]:
        """The vision half (what HiLight's VLM uses): ``vision_model.*``, ``visual_projection.*``, ``logit_scale``."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(("text_model.", "text_projection."))}


class ViPVisionTransformer(nn.Module):
    """Embeddings → pre_layrnorm (HF spelling) → encoder layers → post_layernorm on CLS only."""

    def __init__(self, config: ViPVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = ViPEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = ViPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, pixel_values: torch.Tensor, *, output_hidden_states: bool = False,
                output_proxy_attentions: bool = False) -> VisionOutput:
        if pixel_values.dim() != 5:
            raise ValueError(f"pixel_values must be [B, T, C, H, W], got shape {tuple(pixel_values.shape)}")
        hidden = self.pre_layrnorm(self.embeddings(pixel_values))
        num_frames = pixel_values.shape[1]
        all_hidden = [hidden] if output_hidden_states else None
        attentions = [] if output_proxy_attentions else None
        for layer in self.encoder.layers:
            if self.gradient_checkpointing and self.training and not output_proxy_attentions:
                hidden = checkpoint(layer, hidden, num_frames, use_reentrant=False)
            else:
                hidden = layer(hidden, num_frames, attentions)
            if all_hidden is not None:
                all_hidden.append(hidden)
        pooled = self.post_layernorm(hidden[:, 0])
        return VisionOutput(hidden, pooled, tuple(all_hidden) if all_hidden else None,
                            tuple(attentions) if attentions is not None else None)


class ViPEncoder(nn.Module):
    """Holds the layers under ``encoder.layers.{i}`` (the checkpoint's names)."""

    def __init__(self, config: ViPVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(ViPEncoderLayer(config) for _ in range(config.num_hidden_layers))


class ViPEncoderLayer(nn.Module):
    """CLIP pre-LN block: x + attn(LN1(x)); x + MLP(LN2(x))."""

    def __init__(self, config: ViPVisionConfig):
        super().__init__()
        self.self_attn = ViPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)  # reads hidden_size / intermediate_size / hidden_act
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, num_frames: int, attentions: list | None = None) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.layer_norm1(hidden), num_frames, attentions)
        return hidden + self.mlp(self.layer_norm2(hidden))


class ViPAttention(nn.Module):
    """Proxy-guided attention in its factorised form (XP ``CLIPAttention.forward2``).

    Patch queries of frame n attend to [M proxies ; the L patches of frame n]; the M proxy queries attend to all
    M + N·L tokens. Equivalent to full attention under a boolean mask (``proxy_guided_mask``), but the scores are
    [B·N, H, L, M+L] plus [B, H, M, S] instead of [B, H, S, S] — about N times less work and memory.
    ``dense=True`` computes the masked full attention instead (the benchmark and test baseline)."""

    def __init__(self, config: ViPVisionConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_proxies = config.num_proxies
        self.dropout = config.attention_dropout
        self.dense = False
        d = config.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(proj.weight, std=d**-0.5 * (2 * config.num_hidden_layers) ** -0.5)
            nn.init.zeros_(proj.bias)
        nn.init.normal_(self.out_proj.weight, std=d**-0.5)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, hidden: torch.Tensor, num_frames: int, attentions: list | None = None) -> torch.Tensor:
        b, s, d = hidden.shape
        m, h, hd = self.num_proxies, self.num_heads, self.head_dim
        n = num_frames
        patches = (s - m) // n
        if m + n * patches != s:
            raise ValueError(f"sequence length {s} is not {m} proxies + {n} frames x L patches")
        q, k, v = (p(hidden).view(b, s, h, hd).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        dropout = self.dropout if self.training else 0.0

        if self.dense:
            mask = proxy_guided_mask(m, n, patches, hidden.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        else:
            # proxies: [B, H, M, hd] over all S keys
            proxy_out = F.scaled_dot_product_attention(q[:, :, :m], k, v, dropout_p=dropout)
            # patches: one attention per frame over [M proxies ; own frame]: [B·N, H, L, hd] over M + L keys
            def per_frame(x: torch.Tensor) -> torch.Tensor:  # [B, H, N·L, hd] -> [B·N, H, L, hd]
                return x.view(b, h, n, patches, hd).transpose(1, 2).reshape(b * n, h, patches, hd)

            def with_proxies(x: torch.Tensor) -> torch.Tensor:  # -> [B·N, H, M + L, hd]
                proxies = x[:, :, :m].unsqueeze(1).expand(b, n, h, m, hd).reshape(b * n, h, m, hd)
                return torch.cat([proxies, per_frame(x[:, :, m:])], dim=2)

            frame_out = F.scaled_dot_product_attention(per_frame(q[:, :, m:]), with_proxies(k), with_proxies(v),
                                                       dropout_p=dropout)
            frame_out = frame_out.view(b, n, h, patches, hd).transpose(1, 2).reshape(b, h, n * patches, hd)
            out = torch.cat([proxy_out, frame_out], dim=2)

        if attentions is not None:  # proxy rows only: cheap ([B, H, M, S]) and what attention maps need
            scores = (q[:, :, :m] * hd**-0.5) @ k.transpose(-1, -2)
            attentions.append(scores.softmax(-1).detach())
        return self.out_proj(out.transpose(1, 2).reshape(b, s, d))


def proxy_guided_mask(num_proxies: int, num_frames: int, patches: int, device=None) -> torch.Tensor:
    """[S, S] boolean mask (True = may attend) equivalent to the factorised attention."""
    s = num_proxies + num_frames * patches
    frame = torch.full((s,), -1, device=device)
    frame[num_proxies:] = torch.arange(num_frames, device=device).repeat_interleave(patches)
    is_proxy_key = frame == -1
    same_frame = frame[:, None] == frame[None, :]
    mask = same_frame | is_proxy_key[None, :]
    mask[:num_proxies] = True
    return mask


class ViPEmbeddings(nn.Module):
    """Patches + temporal embedding + shared spatial positions; CLS and proxies get position row 0 and no time."""

    def __init__(self, config: ViPVisionConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.class_embedding = nn.Parameter(torch.randn(d) * d**-0.5)
        self.added_cls = nn.Parameter(torch.randn(config.add_cls_num, d))  # N(0, 1) as in CLIP-ViP
        self.temporal_embedding = nn.Parameter(torch.zeros(1, config.temporal_size, d))
        self.patch_embedding = nn.Conv2d(config.num_channels, d, config.patch_size, config.patch_size, bias=False)
        self.position_embedding = nn.Embedding(config.num_patches + 1, d)
        # the original registers this buffer as persistent; ours is not, and the loader drops it (after checking it)
        self.register_buffer("position_ids", torch.arange(config.num_patches + 1).unsqueeze(0), persistent=False)
        nn.init.normal_(self.patch_embedding.weight, std=config.initializer_range)
        nn.init.normal_(self.position_embedding.weight, std=config.initializer_range)

    def temporal(self, num_frames: int) -> torch.Tensor:
        """[1, T, D]; linearly interpolated along time when T differs from ``temporal_size``."""
        table = self.temporal_embedding
        if num_frames != table.shape[1]:
            table = F.interpolate(table.transpose(1, 2), size=num_frames, mode="linear").transpose(1, 2)
        return table

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        b, t, c, hgt, wdt = pixel_values.shape
        size = self.config.image_size
        if (hgt, wdt) != (size, size):
            raise ValueError(f"frames must be {size}x{size} (the model's image_size), got {hgt}x{wdt}")
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.reshape(b * t, c, hgt, wdt).to(weight.dtype))
        patches = patches.flatten(2).transpose(1, 2).view(b, t, -1, patches.shape[1])  # [B, T, L, D]
        pos = self.position_embedding(self.position_ids)  # [1, L + 1, D]
        if self.config.use_temporal_embed:
            patches = patches + self.temporal(t)[:, :, None, :]
        patches = patches + pos[:, None, 1:, :]
        proxies = torch.cat([self.class_embedding[None], self.added_cls], dim=0) + pos[0, :1]  # [M, D]
        return torch.cat([proxies.expand(b, -1, -1), patches.reshape(b, -1, patches.shape[-1])], dim=1)


def build_clipvip(config: CLIPViPConfig, *, seed: int | None = None) -> CLIPViPModel:
    """A randomly initialised model (a seed makes the init reproducible)."""
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return CLIPViPModel(config)
    return CLIPViPModel(config)
