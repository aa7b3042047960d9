"""TokenMining: the reference's names, sizes and forward; the three depths; strict loading of reference files."""

from __future__ import annotations

import math

import pytest
import torch

from hilight.models.checkpoints import CheckpointError
from hilight.models.token_mining import TokenMining, TokenMiningConfig, detect_depth, load_token_mining

TINY = dict(video_dim=24, image_dim=16, llm_dim=40, expand=4)
REFERENCE_KEYS = {f"{m}.{i}.{p}" for m, idx in (("query_projector", (0, 1)), ("key_projector", (0, 1)),
                                                ("val_projector", (0, 1)), ("LongCLIP_projector", (0,)),
                                                ("CLIP_VIP_projector", (0,)), ("tokenizer_projector", (0, 1, 3)))
                  for i in idx for p in ("weight", "bias")}


def test_reference_layout_names_and_size():
    model = TokenMining(TokenMiningConfig())  # real shapes: (768, 512, 2048), expand 32
    sd = model.state_dict()
    assert set(sd) == REFERENCE_KEYS and len(sd) == 22
    assert sum(p.numel() for p in model.parameters()) == 6_892_864  # the reference's count
    assert model.config.num_tokens(12) == 384


def test_query_expansion_is_the_reference_memory_view():
    torch.manual_seed(0)
    model = TokenMining(TokenMiningConfig(**TINY))
    x = torch.randn(2, 3, 16)
    q = model.queries(x)  # [B, T*e, d]
    assert q.shape == (2, 12, 16)
    w, b = model.LongCLIP_projector[0].weight[:, 0], model.LongCLIP_projector[0].bias
    for n in range(3):
        for j in range(4):
            for p in range(16):
                f = j * 16 + p
                d, k = f // 4, f % 4  # query token j of frame n, channel p <- dim d of frame n, expansion k
                expected = torch.relu(w[k] * x[:, n, d] + b[k])
                assert torch.allclose(q[:, n * 4 + j, p], expected, atol=1e-6)


def _reference_forward(model: TokenMining, vid: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    """The reference forward, written out step by step (hilight-reference §1.3)."""
    b, t, d = img.shape
    v = torch.relu(model.CLIP_VIP_projector[0](vid))
    a = torch.relu(model.LongCLIP_projector[0](img.unsqueeze(2).reshape(b * t * d, 1))).view(b, t, 4, d).view(b, t * 4, d)
    q = model.query_projector(a)
    k, val = model.key_projector(v), model.val_projector(v)
    att = (q @ (k.transpose(-1, -2) / math.sqrt(d))).nan_to_num().softmax(-1)
    tp = model.tokenizer_projector
    return torch.relu(tp[3](torch.relu(tp[1](tp[0](att @ val)))))


def test_forward_matches_the_reference_and_is_nonnegative():
    torch.manual_seed(1)
    model = TokenMining(TokenMiningConfig(**TINY))
    vid, img = torch.randn(2, 1 + 3 * 9, 24), torch.randn(2, 3, 16)
    out = model(vid, img)
    assert out.shape == (2, 12, 40) and (out >= 0).all()
    assert torch.allclose(out, _reference_forward(model, vid, img), atol=1e-5)
    with pytest.raises(ValueError, match=r"frame_features must be \[B, T, 16\]"):
        model(vid, torch.randn(2, 3, 8))


def test_attention_is_what_forward_pools_with():
    torch.manual_seed(0)
    model = TokenMining(TokenMiningConfig(**TINY))
    vid, img = torch.randn(2, 9, 24), torch.randn(2, 3, 16)
    att = model.attention(vid, img)
    assert att.shape == (2, 12, 9) and torch.allclose(att.sum(-1), torch.ones(2, 12))
    pooled = att @ model.val_projector(model.CLIP_VIP_projector(vid))
    assert torch.allclose(model(vid, img), model.tokenizer_projector(pooled), atol=1e-6)


@pytest.mark.parametrize(("depth", "linears"), [("attn_linear", 1), ("attn_mlp", 2)])
def test_shallower_depths_give_one_token_per_frame(depth, linears):
    model = TokenMining(TokenMiningConfig(**TINY, depth=depth))
    out = model(torch.randn(2, 10, 24), torch.randn(2, 3, 16))
    assert out.shape == (2, 3, 40) and model.config.num_tokens(3) == 3
    assert not hasattr(model, "LongCLIP_projector") and not hasattr(model, "CLIP_VIP_projector")
    assert sum(isinstance(m, torch.nn.Linear) for m in model.tokenizer_projector) == linears
    assert detect_depth(model.state_dict()) == depth


def test_loads_reference_bin_and_pt_strictly(tmp_path):
    torch.manual_seed(2)
    source = TokenMining(TokenMiningConfig(**TINY))
    sd = source.state_dict()
    torch.save({f"model.token_mining.{k}": v.half() for k, v in sd.items()}, tmp_path / "mm_projector.bin")
    torch.save(sd, tmp_path / "token_mining.pt")
    for name in ("mm_projector.bin", "token_mining.pt"):
        model = TokenMining(TokenMiningConfig(**TINY))
        load_token_mining(model, tmp_path / name)
        tol = 1e-2 if name.endswith(".bin") else 0
        assert all(torch.allclose(model.state_dict()[k], v, atol=tol) for k, v in sd.items())
        assert all(p.dtype == torch.float32 for p in model.parameters())

    # the reference's stage-1 output folder (token_mining.bin + config.json, no model.safetensors) loads by its name
    (tmp_path / "TokenMining").mkdir()
    torch.save({f"model.token_mining.{k}": v for k, v in sd.items()}, tmp_path / "TokenMining" / "token_mining.bin")
    (tmp_path / "TokenMining" / "config.json").write_text("{}")
    model = TokenMining(TokenMiningConfig(**TINY))
    load_token_mining(model, tmp_path / "TokenMining")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())

    missing = {k: v for k, v in sd.items() if not k.startswith("val_projector.1")}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="val_projector.1.weight"):
        load_token_mining(TokenMining(TokenMiningConfig(**TINY)), tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="depth 'reference' but the model is 'attn_mlp'"):
        load_token_mining(TokenMining(TokenMiningConfig(**TINY, depth="attn_mlp")), tmp_path / "token_mining.pt")
    wide = TokenMining(TokenMiningConfig(**{**TINY, "llm_dim": 48}))
    with pytest.raises(CheckpointError, match="tokenizer_projector"):
        load_token_mining(wide, tmp_path / "token_mining.pt")
    torch.save({**{f"model.token_mining.{k}": v for k, v in sd.items()}, "lm_head.weight": torch.zeros(1)},
               tmp_path / "mixed.bin")
    with pytest.raises(CheckpointError, match="not a TokenMining file"):
        load_token_mining(TokenMining(TokenMiningConfig(**TINY)), tmp_path / "mixed.bin")


def test_an_unknown_key_prefix_is_named_not_taken_for_a_depth(tmp_path):
    sd = TokenMining(TokenMiningConfig(**TINY)).state_dict()
    torch.save({f"module.mm_projector.{k}": v for k, v in sd.items()}, tmp_path / "ddp.pt")
    with pytest.raises(CheckpointError) as err:
        load_token_mining(TokenMining(TokenMiningConfig(**TINY)), tmp_path / "ddp.pt")
    msg = str(err.value)
    assert "unknown prefix(es) ['module.mm_projector.']" in msg and "depth" not in msg
    torch.save({"text_model.embeddings.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"unknown prefix\(es\) \['text_model.embeddings.weight'\]"):
        load_token_mining(TokenMining(TokenMiningConfig(**TINY)), tmp_path / "other.pt")
