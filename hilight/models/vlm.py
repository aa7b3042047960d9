"""The HiLight video-language model: CLIP-ViP + Long-CLIP → TokenMining → Gemma (transformers).

Data flow (hilight-reference §1.0): the same clip tensor ``[B, T, 3, S, S]`` feeds both frozen towers; CLIP-ViP's
last hidden states ``[B, 2356, 768]`` give keys/values and Long-CLIP's frame vectors ``[B, T, 512]`` give queries
to TokenMining, whose ``[B, 384, 2048]`` video tokens replace each ``<video>`` placeholder (id -200) in the
prompt's embeddings; Gemma then runs on ``inputs_embeds``.

Differences from the reference, each deliberate:

- Embedding scale: Gemma multiplies its input embeddings by sqrt(hidden). transformers 4.38 (the reference) did it
  to the whole ``inputs_embeds`` (video tokens included); transformers 5 does it inside ``embed_tokens``. The video
  tokens are multiplied by the same factor here, so released TokenMining weights see the numerics they were
  trained with.
- dtype: embeddings and video tokens follow the LLM's dtype (the reference cast everything to fp16).
- Videos are matched to placeholders in order across the batch and the counts must agree: a sample may hold zero,
  one or several ``<video>``; any mismatch raises ``SpliceError`` (the reference silently consumed a video for a
  sample without a placeholder).
- The Gemma activation is pinned by the caller (``hidden_act``), so results do not change with the transformers
  version (4.38 used exact GELU; later versions default to the tanh approximation).
- Weight loading is strict: a missing or unexpected LLM weight fails instead of being randomly initialised.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import GemmaConfig, GemmaForCausalLM

from hilight.data.conversations import IGNORE_INDEX, VIDEO_TOKEN_INDEX
from hilight.models.checkpoints import CheckpointError
from hilight.models.clipvip import CLIPViPModel
from hilight.models.longclip import LongCLIPImageTower
from hilight.models.token_mining import TokenMining

log = logging.getLogger(__name__)

PRESET_DIR = Path(__file__).parent / "presets" / "gemma"
# keys a merged HiLight directory may hold beside Gemma's: TokenMining (loaded separately) and tower weights,
# which the reference never stored but are ignored if present (hilight-reference §7.4)
# keys a HiLight or MGM (Mini-Gemini) checkpoint holds beside Gemma's, not part of the LLM: TokenMining, the vision
# towers, and MGM's projector and "uni" modules, which HiLight's TokenMining replaces (MGM:mgm_arch.py)
HILIGHT_EXTRA_PREFIXES = ("model.token_mining.", "model.vision_tower", "model.mm_projector.", "model.vlm_uni_")
LLM_MODEL_TYPES = ("gemma", "hilight_gemma", "mgm_gemma")  # Gemma-2B, a merged HiLight dir, MGM-2B


class SpliceError(ValueError):
    """The number of ``<video>`` placeholders and videos differ, or a batch is malformed."""


def gemma_config(preset: str, *, vocab_size: int | None = None, hidden_act: str = "gelu", **special_ids) -> GemmaConfig:
    """A ``GemmaConfig`` from ``presets/gemma/<preset>.json`` with the activation pinned."""
    path = PRESET_DIR / f"{preset}.json"
    if not path.is_file():
        raise ValueError(f"unknown Gemma preset {preset!r}; choose one of {sorted(p.stem for p in PRESET_DIR.glob('*.json'))}")
    values = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    rope = values.pop("rope_theta")
    if vocab_size is not None:
        values["vocab_size"] = vocab_size
    return GemmaConfig(**values, rope_parameters={"rope_type": "default", "rope_theta": rope}, hidden_act=hidden_act,
                       **special_ids)


def build_llm(config: GemmaConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> GemmaForCausalLM:
    torch.manual_seed(seed)
    return GemmaForCausalLM(config).to(dtype)


def load_llm(directory: str | Path, *, hidden_act: str, dtype: torch.dtype = torch.float32) -> GemmaForCausalLM:
    """Gemma (or a merged HiLight directory, ``model_type: hilight_gemma``, or MGM-2B, ``mgm_gemma``) from a local
    directory, strictly: every Gemma tensor must be there and match; the others must be vision-side modules."""
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{directory} is not a model directory ({cfg_path.name} is missing); point llm.dir at a "
                              "local Gemma-2B directory (config.json + *.safetensors + tokenizer files)")
    raw = json.loads(cfg_path.read_text())
    if raw.get("model_type") not in LLM_MODEL_TYPES:
        raise CheckpointError(f"{cfg_path} has model_type {raw.get('model_type')!r}; HiLight needs a Gemma LLM "
                              f"({', '.join(LLM_MODEL_TYPES)})")
    raw = {k: v for k, v in raw.items() if k not in ("model_type", "architectures", "hidden_activation")}
    config = GemmaConfig(**raw)
    if config.hidden_act != hidden_act:
        log.info("%s: pinning the activation to %r (the directory says %r)", directory, hidden_act, config.hidden_act)
    config.hidden_act = hidden_act
    model, info = GemmaForCausalLM.from_pretrained(str(directory), config=config, dtype=dtype, local_files_only=True,
                                                   output_loading_info=True)
    unexpected = [k for k in info["unexpected_keys"] if not k.startswith(HILIGHT_EXTRA_PREFIXES)]
    if ignored := len(info["unexpected_keys"]) - len(unexpected):
        log.info("%s: %d non-LLM tensors (vision towers, projectors, TokenMining) left out of the LLM", directory, ignored)
    problems = {"missing": info["missing_keys"], "unexpected": unexpected, "mismatched": info["mismatched_keys"]}
    if any(problems.values()):
        raise CheckpointError(f"{directory} does not match its config: " + "; ".join(
            f"{len(v)} {k}: {sorted(map(str, v))[:10]}" for k, v in problems.items() if v))
    return model


@dataclass
class Spliced:
    inputs_embeds: torch.Tensor  # [B, L', D]
    attention_mask: torch.Tensor  # [B, L']
    position_ids: torch.Tensor  # [B, L']
    labels: torch.Tensor | None  # [B, L'], IGNORE_INDEX at video and padding positions


class HiLightVLM(nn.Module):
    """``llm`` + ``token_mining`` (+ the two towers, which may be left out when features come from a cache)."""

    def __init__(self, llm: GemmaForCausalLM, token_mining: TokenMining, clipvip: CLIPViPModel | None = None,
                 longclip: LongCLIPImageTower | None = None):
        super().__init__()
        self.llm, self.token_mining, self.clipvip, self.longclip = llm, token_mining, clipvip, longclip
        if token_mining.config.llm_dim != llm.config.hidden_size:
            raise ValueError(f"TokenMining outputs {token_mining.config.llm_dim}-d tokens but the LLM is "
                             f"{llm.config.hidden_size} wide; set token_mining.llm_dim")

    @property
    def embed_scale(self) -> float:
        return float(getattr(self.llm.get_input_embeddings(), "scalar_embed_scale", 1.0))

    @torch.no_grad()
    def tower_features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen towers: ``[B, T, 3, S, S]`` → (CLIP-ViP last hidden states ``[B, S', Dv]``, Long-CLIP frame
        vectors ``[B, T, Di]``)."""
        if self.clipvip is None or self.longclip is None:
            raise RuntimeError("this model was built without its vision towers; pass cached features instead")
        video = self.clipvip.encode_video(pixel_values.to(next(self.clipvip.parameters()).dtype)).last_hidden_state
        frames = self.longclip(pixel_values.to(next(self.longclip.parameters()).dtype))
        return video, frames

    def splice(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, video_tokens: torch.Tensor | None,
               labels: torch.Tensor | None = None, *, padding_side: str = "right") -> Spliced:
        """Replace each placeholder by the next video's token block (in batch order) and re-pad."""
        is_video = (input_ids == VIDEO_TOKEN_INDEX) & attention_mask.bool()
        n_slots, n_videos = int(is_video.sum()), 0 if video_tokens is None else video_tokens.shape[0]
        if n_slots != n_videos:
            per_sample = is_video.sum(1).tolist()
            raise SpliceError(f"the batch has {n_slots} <video> placeholders (per sample {per_sample}) but "
                              f"{n_videos} videos; give one video per placeholder, in order")
        embed = self.llm.get_input_embeddings()
        text = embed(torch.where(input_ids < 0, torch.zeros_like(input_ids), input_ids))  # scaled inside (Gemma)
        if video_tokens is not None:
            video_tokens = video_tokens.to(text.dtype) * self.embed_scale
        rows, row_labels, v = [], [], 0
        for b in range(input_ids.shape[0]):
            keep = attention_mask[b].bool()
            emb, slots = text[b][keep], is_video[b][keep].nonzero().flatten().tolist()
            lab = labels[b][keep] if labels is not None else None
            pieces, label_pieces, start = [], [], 0
            for s in slots:
                pieces += [emb[start:s], video_tokens[v]]
                if lab is not None:
                    label_pieces += [lab[start:s], lab.new_full((video_tokens.shape[1],), IGNORE_INDEX)]
                start, v = s + 1, v + 1
            pieces.append(emb[start:])
            rows.append(torch.cat(pieces))
            if lab is not None:
                label_pieces.append(lab[start:])
                row_labels.append(torch.cat(label_pieces))
        width = max(len(r) for r in rows)
        embeds = text.new_zeros(len(rows), width, text.shape[-1])
        mask = attention_mask.new_zeros(len(rows), width)
        out_labels = None if labels is None else labels.new_full((len(rows), width), IGNORE_INDEX)
        for b, r in enumerate(rows):
            span = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
            embeds[b, span], mask[b, span] = r, 1
            if out_labels is not None:
                out_labels[b, span] = row_labels[b]
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return Spliced(embeds, mask, position_ids, out_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None, *,
                video_tokens: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                video_features: torch.Tensor | None = None, frame_features: torch.Tensor | None = None,
                num_items_in_batch: torch.Tensor | None = None):
        """Gemma's causal-LM output (``.loss`` when ``labels`` are given). The video comes as ready ``video_tokens``,
        as tower ``*_features`` (e.g. from the cache) or as ``pixel_values``; or not at all for text-only input.
        ``num_items_in_batch``: divide the summed token loss by this instead of taking the batch mean (DDP).

        The LLM gets no attention mask: ``splice`` right-pads, so under the causal mask no real position can see a
        padding one, and padding positions carry no labels. Without a mask SDPA runs its causal kernel (flash
        attention on GPUs) instead of materialising a [B, 1, L, L] mask."""
        if video_tokens is None and (video_features is not None or pixel_values is not None):
            if video_features is None:
                video_features, frame_features = self.tower_features(pixel_values)
            video_tokens = self.token_mining(video_features, frame_features)
        s = self.splice(input_ids, attention_mask, video_tokens, labels)
        return self.llm(inputs_embeds=s.inputs_embeds, attention_mask=None, position_ids=s.position_ids,
                        labels=s.labels, num_items_in_batch=num_items_in_batch)

    def token_loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                   video_tokens: torch.Tensor | None) -> tuple[float, int]:
        """(summed answer-token loss, answer tokens) of a batch, for per-token means over a whole set."""
        s = self.splice(input_ids, attention_mask, video_tokens, labels)
        logits = self.llm(inputs_embeds=s.inputs_embeds, attention_mask=None, position_ids=s.position_ids).logits
        return token_loss(logits, s.labels)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, video_tokens: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, **generate_kwargs) -> torch.Tensor:
        """New token ids only ``[B, new]``; prompts are left-padded after splicing so batched generation works."""
        if video_tokens is None and pixel_values is not None:
            video_tokens = self.token_mining(*self.tower_features(pixel_values))
        s = self.splice(input_ids, attention_mask, video_tokens, padding_side="left")
        return self.llm.generate(inputs_embeds=s.inputs_embeds, attention_mask=s.attention_mask, **generate_kwargs)


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """(summed next-token cross-entropy, number of supervised tokens): batches combine into a per-token mean."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    total = nn.functional.cross_entropy(shift_logits.flatten(0, 1), shift_labels.flatten(), ignore_index=IGNORE_INDEX,
                                        reduction="sum")
    return float(total), int((shift_labels != IGNORE_INDEX).sum())


def trainable_parameter_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def freeze_all_but(model: nn.Module, prefixes: tuple[str, ...]) -> list[str]:
    """Freeze every parameter not under ``prefixes``; returns the trainable names and asserts the set is exactly
    those prefixes' parameters (the reference's ``check_requires_grad``)."""
    model.requires_grad_(False)
    for name, p in model.named_parameters():
        if name.startswith(prefixes):
            p.requires_grad_(True)
    trainable = trainable_parameter_names(model)
    wrong = [n for n in trainable if not n.startswith(prefixes)]
    if wrong or not trainable:
        raise RuntimeError(f"trainable set is wrong: expected only {prefixes}, got {wrong or 'nothing'}")
    return trainable
