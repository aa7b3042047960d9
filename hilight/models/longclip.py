"""The Long-CLIP image tower: transformers' ``CLIPVisionModelWithProjection`` fed each frame of a clip, giving one
projected vector per frame, ``[B, T, projection_dim]`` (not L2-normalised, as in the reference).

``convert_longclip_visual`` maps the original OpenAI-style ``longclip-B.pt`` (plain state dict) onto transformers'
names: the rename table of ``docs/reference/clipvip-sparc-longclip.md`` §3.4, with packed ``in_proj`` split into
q/k/v and ``visual.proj`` transposed. The VLM uses only this vision half; the text tower's keys are recognised and
set aside. Any other key that is not consumed fails the conversion, naming it.

``convert_longclip_text`` maps the text half for a full ``CLIPModel`` (``load_longclip_clip``): Long-CLIP's two
248-row position tables are folded into one, ``cat(positional_embedding[:20], positional_embedding_res[20:])``,
which is exact at inference because the original adds ``pe`` on positions 0-19 and ``pe_res`` on 20-247. Pooling
at the argmax token (the original) is transformers' legacy ``eos_token_id=2`` path; call it without an attention
mask, as the original uses only the causal mask.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, CLIPVisionModelWithProjection

from hilight.models.checkpoints import CheckpointError, load_strict, read_state_dict

log = logging.getLogger(__name__)

TEXT_KEYS = re.compile(r"^(token_embedding\.|positional_embedding(_res)?$|transformer\.|ln_final\.|text_projection$"
                       r"|logit_scale$|input_resolution$|context_length$|vocab_size$)")
PRESET_DIR = Path(__file__).parent / "presets" / "longclip"
LAYER_RENAMES = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                 "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


DEFAULT_PRESET = "longclip-b16"  # the VLM's tower: LongCLIP-B (reference §5)
KEEP_POSITIONS = 20  # Long-CLIP keeps CLIP's first 20 positions (positional_embedding); 20..247 are stretched


def _rename_block(key: str, value: torch.Tensor, src: str, dst: str, out: dict) -> bool:
    """One ``{src}transformer.resblocks.{i}.*`` tensor → transformers' encoder layer names; False if not a block key."""
    if m := re.match(rf"^{re.escape(src)}transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", key):
        i, kind = m.groups()
        for part, chunk in zip("qkv", value.chunk(3, dim=0), strict=True):  # packed [3W, W] -> q, k, v
            out[f"{dst}encoder.layers.{i}.self_attn.{part}_proj.{kind}"] = chunk.contiguous()
        return True
    if m := re.match(rf"^{re.escape(src)}transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$", key):
        i, name, kind = m.groups()
        if name in LAYER_RENAMES:
            out[f"{dst}encoder.layers.{i}.{LAYER_RENAMES[name]}.{kind}"] = value
            return True
    return False


def longclip_config(sd: dict[str, torch.Tensor], source: str = "longclip") -> CLIPVisionConfig:
    """The vision architecture of an original-layout state dict, read from its shapes (as ``build_model`` does)."""
    needed = ["visual.conv1.weight", "visual.positional_embedding", "visual.proj",
              "visual.transformer.resblocks.0.mlp.c_fc.weight"]
    if missing := [k for k in needed if k not in sd]:
        tops = sorted({k.split(".")[0] for k in sd})[:6]
        guess = (" (vision_model.* keys: a CLIP-ViP or transformers CLIP checkpoint? It goes to vision.clipvip)"
                 if "vision_model" in tops else "")
        raise CheckpointError(f"{source} is not an original-layout Long-CLIP file: no {missing[0]!r} (its keys start "
                              f"with {tops}){guess}; vision.longclip takes the released longclip-B.pt / longclip-L.pt")
    width = sd["visual.conv1.weight"].shape[0]
    patch = sd["visual.conv1.weight"].shape[-1]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    layers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
    return CLIPVisionConfig(hidden_size=width, intermediate_size=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                            num_hidden_layers=layers, num_attention_heads=max(width // 64, 1), image_size=grid * patch,
                            patch_size=patch, projection_dim=sd["visual.proj"].shape[1], hidden_act="quick_gelu",
                            layer_norm_eps=1e-5)


def convert_longclip_visual(sd: dict[str, torch.Tensor], source: str = "longclip") -> dict[str, torch.Tensor]:
    """Original ``visual.*`` keys → ``CLIPVisionModelWithProjection`` keys (float32)."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    fixed = {"visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
             "visual.class_embedding": "vision_model.embeddings.class_embedding",
             "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
             "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight", "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
             "visual.ln_post.weight": "vision_model.post_layernorm.weight",
             "visual.ln_post.bias": "vision_model.post_layernorm.bias"}
    for key, value in sd.items():
        value = value.float()
        if key in fixed:
            out[fixed[key]] = value
        elif key == "visual.proj":
            out["visual_projection.weight"] = value.t().contiguous()  # x @ proj  ==  Linear(weight=proj.T)
        elif key.startswith("visual."):
            if not _rename_block(key, value, "visual.", "vision_model.", out):
                unknown.append(key)
        elif not TEXT_KEYS.match(key):
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} keys are not part of the Long-CLIP layout: {unknown[:10]}")
    return out


def longclip_preset(name: str) -> CLIPVisionConfig:
    """A vision config from ``presets/longclip/<name>.json`` (random-init towers for tests and the demo)."""
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown Long-CLIP preset {name!r}; choose one of {sorted(p.stem for p in PRESET_DIR.glob('*.json'))}")
    return CLIPVisionConfig(**{k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")})


ARCHITECTURE = {"num_hidden_layers": "depth (blocks)", "hidden_size": "width", "intermediate_size": "MLP width",
                "patch_size": "patch size", "image_size": "image size", "projection_dim": "projection size"}


def check_architecture(found: CLIPVisionConfig, expected: CLIPVisionConfig, source: str, preset: str) -> None:
    """Refuse a file whose vision tower differs from the configured one (a truncated or other-size checkpoint would
    otherwise load as a smaller tower without error), naming each difference with both numbers."""
    diffs = [f"{what} {getattr(found, key)} in the file vs {getattr(expected, key)} in {preset}"
             for key, what in ARCHITECTURE.items() if getattr(found, key) != getattr(expected, key)]
    if diffs:
        raise CheckpointError(f"{source} is not the configured Long-CLIP tower: {'; '.join(diffs)}. Use the matching "
                              "file (longclip-B.pt for LongCLIP-B), or configure the preset the file was trained as")


def convert_longclip_text(sd: dict[str, torch.Tensor], source: str = "longclip") -> dict[str, torch.Tensor]:
    """Original text keys → ``CLIPTextModelWithProjection`` keys (float32), the two position tables folded."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in sd.items():
        value = value.float()
        if key.startswith("visual.") or key in ("positional_embedding", "positional_embedding_res", "logit_scale",
                                                "input_resolution", "context_length", "vocab_size"):
            continue
        if key == "token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = value
        elif key in ("ln_final.weight", "ln_final.bias"):
            out[f"text_model.final_layer_norm.{key.rsplit('.', 1)[1]}"] = value
        elif key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()  # x @ P  ==  Linear(weight=P.T)
        elif not _rename_block(key, value, "", "text_model.", out):
            unknown.append(key)
    for table in ("positional_embedding", "positional_embedding_res"):
        if table not in sd:
            raise CheckpointError(f"{source} has no {table!r}; a Long-CLIP checkpoint holds both 248-row tables")
    out["text_model.embeddings.position_embedding.weight"] = torch.cat(
        [sd["positional_embedding"][:KEEP_POSITIONS].float(), sd["positional_embedding_res"][KEEP_POSITIONS:].float()])
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} keys are not part of the Long-CLIP layout: {unknown[:10]}")
    return out


def longclip_clip_config(sd: dict[str, torch.Tensor], source: str = "longclip") -> CLIPConfig:
    """Full Long-CLIP architecture (vision + text) from an original state dict's shapes."""
    vision = longclip_config(sd, source)  # first: it says what the file is when it is not Long-CLIP
    if "ln_final.weight" not in sd:
        raise CheckpointError(f"{source} holds Long-CLIP's image tower only (no text tower: no 'ln_final.weight'); "
                              "the whole model needs the released checkpoint with both")
    width = sd["ln_final.weight"].shape[0]
    layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    text = CLIPTextConfig(vocab_size=sd["token_embedding.weight"].shape[0], hidden_size=width,
                          intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                          num_hidden_layers=layers, num_attention_heads=max(width // 64, 1),
                          max_position_embeddings=sd["positional_embedding"].shape[0], hidden_act="quick_gelu",
                          layer_norm_eps=1e-5, eos_token_id=2)  # 2 = pool at the argmax token, as the original
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                      projection_dim=sd["text_projection"].shape[1])


def load_longclip_clip(path) -> CLIPModel:
    """The whole Long-CLIP (both towers, logit scale) as a transformers ``CLIPModel``, loaded strictly."""
    sd = read_state_dict(path)
    model = CLIPModel(longclip_clip_config(sd, str(path)))
    converted = {**convert_longclip_visual(sd, str(path)), **convert_longclip_text(sd, str(path)),
                 "logit_scale": sd["logit_scale"].float().reshape(())}
    load_strict(model, converted, str(path), ignore_prefixes=("text_model.embeddings.position_ids",
                                                              "vision_model.embeddings.position_ids"))
    return model


class LongCLIPImageTower(nn.Module):
    """Each frame → ``ln_post(CLS) @ proj``; ``[B, T, 3, S, S]`` → ``[B, T, projection_dim]``."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.model = CLIPVisionModelWithProjection(config)

    @classmethod
    def from_original(cls, path, preset: str | CLIPVisionConfig | None = DEFAULT_PRESET) -> LongCLIPImageTower:
        """Build from an original-layout file (``longclip-B.pt``), loading the vision half strictly. The file's
        architecture (read from its shapes) must be the ``preset``'s (a name in ``presets/longclip`` or a config);
        ``None`` takes whatever the file holds."""
        sd = read_state_dict(path)
        found = longclip_config(sd, str(path))
        if preset is not None:
            check_architecture(found, longclip_preset(preset) if isinstance(preset, str) else preset, str(path),
                               preset if isinstance(preset, str) else "the configured tower")
        tower = cls(found)
        load_strict(tower.model, convert_longclip_visual(sd, str(path)), str(path))
        return tower

    @classmethod
    def from_saved(cls, directory) -> LongCLIPImageTower:
        """Load a tower written with ``tower.model.save_pretrained(directory)``, strictly."""
        model, info = CLIPVisionModelWithProjection.from_pretrained(str(directory), local_files_only=True,
                                                                    output_loading_info=True)
        problems = {k: info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info[k]}
        if problems:
            raise CheckpointError(f"{directory} does not match its config: {problems}")
        tower = cls.__new__(cls)
        nn.Module.__init__(tower)
        tower.model = model
        return tower

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.dim() != 5:
            raise ValueError(f"pixel_values must be [B, T, C, H, W], got shape {tuple(pixel_values.shape)}")
        b, t = pixel_values.shape[:2]
        embeds = self.model(pixel_values=pixel_values.flatten(0, 1)).image_embeds  # [B*T, P]
        return embeds.view(b, t, -1)
