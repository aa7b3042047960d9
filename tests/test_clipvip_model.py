"""CLIP-ViP: token layout, factorised attention vs the dense masked form, temporal interpolation, strict loading."""

from __future__ import annotations

import pytest
import torch

from hilight.models.checkpoints import CheckpointError, load_clipvip_weights, read_state_dict, save_model
from hilight.models.clipvip import build_clipvip, load_preset, proxy_guided_mask


@pytest.fixture(scope="module")
def tiny():
    return load_preset("tiny")


def _video(cfg, b=2, t=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = cfg.vision.image_size
    return torch.randn(b, t or cfg.num_frames, 3, s, s, generator=g)


def test_presets_have_the_real_token_layout():
    b16 = load_preset("clipvip-b16")
    assert b16.seq_len == 2356 and b16.vision.num_patches == 196 and b16.vision.num_proxies == 4
    model = build_clipvip(b16)
    vision = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("text"))
    assert vision == 86_204_161  # the reference's VidCLIP vision parameter count


def test_factorised_attention_equals_dense_mask(tiny):
    model = build_clipvip(tiny, seed=0).eval()
    x = _video(tiny)
    fact = model.encode_video(x, output_hidden_states=True)
    for layer in model.vision_model.encoder.layers:
        layer.self_attn.dense = True
    dense = model.encode_video(x, output_hidden_states=True)
    assert fact.last_hidden_state.shape == (2, tiny.seq_len, tiny.vision.hidden_size)
    for a, b in zip(fact.hidden_states, dense.hidden_states, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_patches_only_see_proxies_and_their_own_frame(tiny):
    """Changing frame 1 changes frame-0 patch outputs only through the proxies, so with one layer and the
    proxies' keys unchanged at layer input, frame 0's first-layer output is unaffected."""
    model = build_clipvip(tiny.model_copy(update={"vision": tiny.vision.model_copy(update={"num_hidden_layers": 1})}),
                          seed=0).eval()
    x = _video(tiny)
    y = x.clone()
    y[:, 1] += 1.0
    m, l = tiny.vision.num_proxies, tiny.vision.num_patches
    a = model.encode_video(x).last_hidden_state
    b = model.encode_video(y).last_hidden_state
    torch.testing.assert_close(a[:, m:m + l], b[:, m:m + l])  # frame 0 untouched
    assert not torch.allclose(a[:, :m], b[:, :m])  # proxies see everything


def test_mask_matches_reference_rule():
    mask = proxy_guided_mask(2, 3, 2)
    assert mask.shape == (8, 8)
    assert mask[:2].all()  # proxy rows see all
    assert mask[:, :2].all()  # everyone sees proxies
    assert mask[2, 3] and not mask[2, 4]  # frame 0 patch sees frame 0, not frame 1


def test_temporal_embedding_is_interpolated_for_other_frame_counts(tiny):
    model = build_clipvip(tiny, seed=0).eval()
    with torch.no_grad():
        model.vision_model.embeddings.temporal_embedding.copy_(torch.linspace(0, 3, 4).view(1, 4, 1).expand(1, 4, 48))
    table = model.vision_model.embeddings.temporal(7)
    assert table.shape == (1, 7, 48)
    assert torch.all(table[0, 1:, 0] >= table[0, :-1, 0])  # linear resize keeps the order
    out = model.encode_video(_video(tiny, t=7))
    assert out.last_hidden_state.shape[1] == tiny.vision.num_proxies + 7 * tiny.vision.num_patches


def test_text_pooling_uses_first_eos_with_eos_padding(tiny):
    model = build_clipvip(tiny, seed=0).eval()
    eos = tiny.text.eos_token_id
    ids = torch.tensor([[0, 5, 6, eos, eos, eos], [0, 7, eos, eos, eos, eos]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
    out = model.encode_text(ids, mask)
    torch.testing.assert_close(out.pooled[0], out.last_hidden_state[0, 3])
    torch.testing.assert_close(out.pooled[1], out.last_hidden_state[1, 2])


def test_logit_scale_clamped_like_the_reference(tiny):
    model = build_clipvip(tiny)
    with torch.no_grad():
        model.logit_scale.fill_(9.0)
    assert model.scale().item() == pytest.approx(200.0)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == pytest.approx(5.298317, rel=1e-6)


# ------------------------------------------------------------------------------------------ checkpoints


def _original_layout(model, prefix="clipmodel.", dtype=None):
    """The tiny model's weights as XPretrain saved them: prefixed keys plus persistent position_ids buffers."""
    sd = {f"{prefix}{k}": (v.to(dtype) if dtype and v.is_floating_point() else v) for k, v in model.state_dict().items()}
    sd[f"{prefix}vision_model.embeddings.position_ids"] = model.vision_model.embeddings.position_ids.clone()
    sd[f"{prefix}text_model.embeddings.position_ids"] = model.text_model.embeddings.position_ids.clone()
    return sd


@pytest.mark.parametrize("prefix,dtype", [("clipmodel.", None), ("module.clipmodel.", None), ("clipmodel.", torch.float16)])
def test_loads_original_and_hilight_layouts(tiny, tmp_path, prefix, dtype):
    src = build_clipvip(tiny, seed=1)
    path = tmp_path / "pretrain_clipvip_base_16.pt"
    torch.save(_original_layout(src, prefix, dtype), path)
    dst = build_clipvip(tiny, seed=2)
    load_clipvip_weights(dst, path)
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values(), strict=True):
        torch.testing.assert_close(a.to(dtype) if dtype else a, b.to(dtype) if dtype else b, msg=k)


def test_vision_only_load_ignores_the_text_tower(tiny, tmp_path):
    src = build_clipvip(tiny, seed=1)
    sd = {k: v for k, v in _original_layout(src).items() if "text_" not in k}
    path = tmp_path / "vision.pt"
    torch.save(sd, path)
    dst = build_clipvip(tiny, seed=2)
    with pytest.raises(CheckpointError, match="missing: text_model"):
        load_clipvip_weights(dst, path)
    load_clipvip_weights(dst, path, part="vision")
    torch.testing.assert_close(dst.visual_projection.weight, src.visual_projection.weight)


def test_mismatched_checkpoints_fail_naming_keys(tiny, tmp_path):
    src = build_clipvip(tiny, seed=1)
    sd = _original_layout(src)
    del sd["clipmodel.vision_model.embeddings.added_cls"]
    sd["clipmodel.vision_model.extra.weight"] = torch.zeros(3)
    sd["clipmodel.visual_projection.weight"] = torch.zeros(7, 48)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as err:
        load_clipvip_weights(build_clipvip(tiny), path)
    msg = str(err.value)
    assert "1 missing: vision_model.embeddings.added_cls" in msg
    assert "1 unexpected: vision_model.extra.weight" in msg
    assert "visual_projection.weight: file (7, 48) vs model (32, 48)" in msg
    # a real B/16 file into the tiny preset: every shape differs, and the message says which preset to use
    assert "preset" in msg


def test_mixed_prefixes_and_bad_position_ids_fail(tiny, tmp_path):
    sd = _original_layout(build_clipvip(tiny))
    sd["vision_model.stray"] = torch.zeros(1)
    torch.save(sd, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match="mixes key layouts"):
        load_clipvip_weights(build_clipvip(tiny), tmp_path / "mixed.pt")
    sd = _original_layout(build_clipvip(tiny))
    sd["clipmodel.vision_model.embeddings.position_ids"] = torch.zeros(1, 17, dtype=torch.long)
    torch.save(sd, tmp_path / "pos.pt")
    with pytest.raises(CheckpointError, match="position_ids is not arange"):
        load_clipvip_weights(build_clipvip(tiny), tmp_path / "pos.pt")


def test_truncated_and_pickled_files_fail_loudly(tiny, tmp_path):
    path = tmp_path / "full.pt"
    torch.save(_original_layout(build_clipvip(tiny)), path)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_clipvip_weights(build_clipvip(tiny), cut)

    torch.save({"x": __import__("os").getcwd}, tmp_path / "evil.pt")  # a global function: refused by weights_only
    with pytest.raises(CheckpointError, match="weights_only"):
        read_state_dict(tmp_path / "evil.pt")

    out = save_model(build_clipvip(tiny), tmp_path / "ours", {"preset": "tiny"})
    blob = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(blob[: len(blob) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_clipvip_weights(build_clipvip(tiny), out)


def test_safetensors_round_trip(tiny, tmp_path):
    src = build_clipvip(tiny, seed=3)
    out = save_model(src, tmp_path / "m", {"model": tiny.model_dump()})
    dst = build_clipvip(tiny, seed=4)
    load_clipvip_weights(dst, out)
    torch.testing.assert_close(dst.logit_scale, src.logit_scale)
    assert (out / "config.json").is_file()
