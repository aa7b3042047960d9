"""Long-CLIP image tower: a tiny checkpoint in the original OpenAI layout (written by an OpenAI-style ViT defined
here, with nn.MultiheadAttention's packed in_proj) converts strictly and gives the same frame vectors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hilight.models.checkpoints import CheckpointError
from hilight.models.longclip import LongCLIPImageTower


class _QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class _Block(nn.Module):
    def __init__(self, w, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(w, heads)
        self.ln_1, self.ln_2 = nn.LayerNorm(w), nn.LayerNorm(w)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(w, 4 * w))
        self.mlp.add_module("gelu", _QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * w, w))

    def forward(self, x):  # [L, B, W] as in OpenAI CLIP
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _OpenAIVisual(nn.Module):
    """OpenAI CLIP's VisionTransformer (the layout of longclip-B.pt's ``visual.*``)."""

    def __init__(self, res=32, patch=8, width=64, layers=2, heads=1, out=24):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * 0.1)
        self.positional_embedding = nn.Parameter(torch.randn((res // patch) ** 2 + 1, width) * 0.1)
        self.ln_pre, self.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(*[_Block(width, heads) for _ in range(layers)])
        self.proj = nn.Parameter(torch.randn(width, out) * 0.1)

    def forward(self, x):
        x = self.conv1(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        x = self.transformer.resblocks(self.ln_pre(x).transpose(0, 1)).transpose(0, 1)
        return self.ln_post(x[:, 0]) @ self.proj


def _original_file(tmp_path, visual):
    sd = {f"visual.{k}": v.half() for k, v in visual.state_dict().items()}  # stored fp16, like the release
    sd.update({"positional_embedding": torch.zeros(248, 16), "positional_embedding_res": torch.zeros(248, 16),
               "token_embedding.weight": torch.zeros(10, 16), "ln_final.weight": torch.ones(16),
               "text_projection": torch.zeros(16, 16), "logit_scale": torch.tensor(4.6)})
    path = tmp_path / "longclip-B.pt"
    torch.save(sd, path)
    return path, sd


def test_converts_original_layout_and_matches_frame_vectors(tmp_path):
    torch.manual_seed(0)
    visual = _OpenAIVisual(width=128, heads=2)  # OpenAI CLIP: heads = width // 64
    path, _ = _original_file(tmp_path, visual)
    tower = LongCLIPImageTower.from_original(path, preset=None).eval()  # the file's own (test-sized) architecture
    cfg = tower.model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.image_size, cfg.patch_size, cfg.projection_dim) == (128, 2, 32, 8, 24)
    frames = torch.randn(2, 3, 3, 32, 32)  # [B, T, C, H, W]
    out = tower(frames)
    assert out.shape == (2, 3, 24)
    visual = visual.half().float().eval()  # the reference ran the fp16-stored weights in fp32
    with torch.no_grad():
        expected = visual(frames.flatten(0, 1)).view(2, 3, 24)
    assert torch.allclose(out, expected, atol=1e-4), (out - expected).abs().max()


def test_conversion_is_strict(tmp_path):
    torch.manual_seed(1)
    path, sd = _original_file(tmp_path, _OpenAIVisual())
    torch.save({k: v for k, v in sd.items() if k != "visual.ln_post.bias"}, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="post_layernorm.bias"):
        LongCLIPImageTower.from_original(tmp_path / "missing.pt", preset=None)
    torch.save({**sd, "visual.extra.weight": torch.zeros(1)}, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match="visual.extra.weight"):
        LongCLIPImageTower.from_original(tmp_path / "extra.pt", preset=None)
    with pytest.raises(ValueError, match=r"\[B, T, C, H, W\]"):
        LongCLIPImageTower.from_original(path, preset=None)(torch.randn(2, 3, 32, 32))


def test_wrong_files_and_wrappers_say_what_they_are(tmp_path):
    """A CLIP-ViP file given as Long-CLIP is named as such; a trainer-style wrapper with other entries beside the
    weights is unwrapped, OpenAI's int metadata dropped, and other non-tensor entries named."""
    torch.manual_seed(3)
    path, sd = _original_file(tmp_path, _OpenAIVisual())
    torch.save({"vision_model.embeddings.patch_embedding.weight": torch.zeros(4, 3, 8, 8)}, tmp_path / "vip.pt")
    with pytest.raises(CheckpointError, match=r"vip.pt is not an original-layout Long-CLIP file: no "
                                              r"'visual.conv1.weight' .* a CLIP-ViP or transformers CLIP checkpoint"):
        LongCLIPImageTower.from_original(tmp_path / "vip.pt", preset=None)
    torch.save({"model": {**sd}, "step": 120000, "epoch": 3}, tmp_path / "wrapped.pt")
    torch.save({**sd, "input_resolution": 32, "context_length": 77, "vocab_size": 49408}, tmp_path / "meta.pt")
    expected = LongCLIPImageTower.from_original(path, preset=None).state_dict()
    for name in ("wrapped.pt", "meta.pt"):
        got = LongCLIPImageTower.from_original(tmp_path / name, preset=None).state_dict()
        assert all(torch.equal(got[k], v) for k, v in expected.items()), name
    torch.save({**sd, "notes": "fine-tuned", "optimizer": {"lr": 1.0}}, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match=r"2 entries are not tensors, e.g. \['notes', 'optimizer'\]"):
        LongCLIPImageTower.from_original(tmp_path / "mixed.pt", preset=None)


def test_a_file_of_another_depth_or_width_than_the_preset_is_refused_with_both_numbers(tmp_path):
    """A truncated (fewer blocks) or other-size file would otherwise load as a smaller tower without error."""
    from transformers import CLIPVisionConfig

    configured = CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=1,
                                  image_size=32, patch_size=8, projection_dim=24, hidden_act="quick_gelu")
    torch.manual_seed(3)
    path, _ = _original_file(tmp_path, _OpenAIVisual())
    assert LongCLIPImageTower.from_original(path, preset=configured).model.config.num_hidden_layers == 2
    (tmp_path / "shallow").mkdir(), (tmp_path / "wide").mkdir()
    shallow, _ = _original_file(tmp_path / "shallow", _OpenAIVisual(layers=1))
    with pytest.raises(CheckpointError, match="depth \\(blocks\\) 1 in the file vs 2 in the configured tower"):
        LongCLIPImageTower.from_original(shallow, preset=configured)
    wide, _ = _original_file(tmp_path / "wide", _OpenAIVisual(width=128, heads=2))
    with pytest.raises(CheckpointError, match="width 128 in the file vs 64 in the configured tower"):
        LongCLIPImageTower.from_original(wide, preset=configured)
    with pytest.raises(CheckpointError) as err:  # the default: LongCLIP-B, ViT-B/16
        LongCLIPImageTower.from_original(path)
    assert "depth (blocks) 2 in the file vs 12 in longclip-b16; width 64 in the file vs 768 in longclip-b16" in str(err.value)


def test_the_vision_config_names_the_towers_preset(tmp_path):
    from hilight.train.vlm_parts import VisionSpec, load_longclip_tower

    torch.manual_seed(4)
    path, _ = _original_file(tmp_path, _OpenAIVisual(res=96, patch=16, width=32, layers=2, heads=2, out=32))
    tower = load_longclip_tower(VisionSpec(clipvip="unused", longclip=str(path), longclip_preset="tiny"))
    assert tower.model.config.image_size == 96 and tower.model.config.projection_dim == 32
    with pytest.raises(CheckpointError, match="in longclip-b16"):  # the default: LongCLIP-B
        load_longclip_tower(VisionSpec(clipvip="unused", longclip=str(path)))


class _OpenAIText(nn.Module):
    """Long-CLIP's text side: OpenAI's causal transformer with two position tables, pe on positions 0-19 and
    pe_res on 20+, pooled at the argmax token and projected."""

    def __init__(self, vocab=50, ctx=28, width=64, layers=2, heads=1, out=24):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.randn(ctx, width) * 0.1)
        self.positional_embedding_res = nn.Parameter(torch.randn(ctx, width) * 0.1)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(*[_Block(width, heads) for _ in range(layers)])
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, out) * 0.1)
        self.logit_scale = nn.Parameter(torch.tensor(4.6))

    def forward(self, ids):
        n = ids.shape[1]
        keep = (torch.arange(n) < 20).float()[:, None]
        x = self.token_embedding(ids) + self.positional_embedding[:n] * keep + self.positional_embedding_res[:n] * (1 - keep)
        mask = torch.full((n, n), float("-inf")).triu(1)
        x = x.transpose(0, 1)
        for block in self.transformer.resblocks:
            h = block.ln_1(x)
            x = x + block.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
            x = x + block.mlp(block.ln_2(x))
        x = self.ln_final(x.transpose(0, 1))
        return x[torch.arange(len(ids)), ids.argmax(-1)] @ self.text_projection


def test_full_clip_conversion_folds_the_two_position_tables(tmp_path):
    from hilight.models.longclip import load_longclip_clip

    torch.manual_seed(2)
    visual, text = _OpenAIVisual(width=64, heads=1), _OpenAIText()
    sd = {**{f"visual.{k}": v for k, v in visual.state_dict().items()}, **text.state_dict()}
    torch.save(sd, tmp_path / "longclip.pt")
    model = load_longclip_clip(tmp_path / "longclip.pt").eval()
    assert model.config.text_config.max_position_embeddings == 28
    ids = torch.randint(1, 40, (3, 26))
    ids[:, 24] = 49  # the end token: the highest id, where the original pools
    with torch.no_grad():
        expected = text.eval()(ids)
        got = model.get_text_features(input_ids=ids)  # no attention mask: causal only, as the original
    got = got if isinstance(got, torch.Tensor) else got.pooler_output
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()  # positions >= 20 use pe_res
    assert torch.allclose(model.logit_scale, torch.tensor(4.6))
    torch.save({k: v for k, v in sd.items() if k != "positional_embedding_res"}, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="positional_embedding_res"):
        load_longclip_clip(tmp_path / "old.pt")
