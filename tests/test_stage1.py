"""Stage 1 (TokenMining pretraining) as a library job: the trainable set, frozen weights untouched, the feature
cache changing nothing but speed, exports in both layouts, resume, the text-LM stand-in, and clear errors."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from hilight.models.checkpoints import read_state_dict
from hilight.models.token_mining import TokenMining, load_saved_token_mining, load_token_mining
from hilight.train.tokenmining import TokenMiningPretrainConfig, run_tokenmining_pretrain
from hilight.train.vlm_parts import VideoAnswerObjective, build_vlm_parts
from hilight.models.vlm import freeze_all_but
from tests.conftest import tokenmining_config


def _config(caption_manifest, vlm_weights, out, **train) -> TokenMiningPretrainConfig:
    return TokenMiningPretrainConfig.model_validate(
        tokenmining_config(caption_manifest, out, vlm_weights["clipvip"], vlm_weights["llm"], **train))


def test_text_lm_stand_in_learned_the_corpus(vlm_weights):
    result = vlm_weights["llm_result"]
    assert result.val_loss < 0.4 * result.val_loss_init  # held-out per-token loss, vs the untrained model
    assert (result.model_dir / "config.json").is_file() and (result.model_dir / "tokenizer.json").is_file()


def test_trainable_set_is_exactly_token_mining(caption_manifest, vlm_weights, tmp_path):
    config = _config(caption_manifest, vlm_weights, tmp_path)
    parts = build_vlm_parts(config.vision, config.llm, config.token_mining)
    trainable = freeze_all_but(parts.vlm, ("token_mining.",))
    assert sorted(trainable) == sorted(f"token_mining.{k}" for k in parts.vlm.token_mining.state_dict())
    assert len(trainable) == 22
    frozen = [n for n, p in parts.vlm.named_parameters() if not p.requires_grad]
    assert any(n.startswith("llm.") for n in frozen) and any(n.startswith("clipvip.") for n in frozen)
    assert any(n.startswith("longclip.") for n in frozen)


def test_stage1_trains_only_token_mining_and_exports_both_layouts(caption_manifest, vlm_weights, tmp_path):
    config = _config(caption_manifest, vlm_weights, tmp_path / "run")
    result = run_tokenmining_pretrain(config)
    assert result.fit.step == 6 and result.samples["train"] > 0 and result.samples["rejected"] == 0
    m = result.metrics
    assert m["lm_loss"] < m["lm_loss_initial"]  # held-out answer loss fell
    assert {"lm_loss_zero_video", "lm_loss_no_video"} <= set(m)
    assert [h["step"] for h in result.fit.history] == [3, 6]
    for h in result.fit.history:  # where TokenMining looks, at each validation
        assert 0 < h["val/tm_attention/global_mass"] <= h["val/tm_attention/global_mass_max"] < 1
        assert 0 < h["val/tm_attention/entropy"] <= 1

    # the LLM on disk is the one the stage read: it was frozen (its weights are not in the checkpoints either)
    ckpt = load_file(result.fit.final_checkpoint / "model.safetensors")
    assert set(ckpt) == set(TokenMining(load_saved_token_mining(result.final_dir).config).state_dict())

    # exports: our safetensors and the reference's .bin (prefix model.token_mining.) hold the same tensors
    saved = load_saved_token_mining(result.final_dir)
    ref = read_state_dict(result.final_dir / "token_mining.bin")
    assert all(k.startswith("model.token_mining.") for k in ref) and len(ref) == 22
    again = TokenMining(saved.config)
    load_token_mining(again, result.final_dir / "token_mining.bin")
    for k, v in saved.state_dict().items():
        assert torch.equal(again.state_dict()[k], v)
        assert torch.equal(ckpt[k], v)

    # same config again: resumes at the end, nothing retrained, same weights
    rerun = run_tokenmining_pretrain(config)
    assert rerun.fit.resumed_from == 6 and rerun.run_dir == result.run_dir


def test_online_features_change_nothing_but_speed(caption_manifest, vlm_weights, tmp_path):
    cached = run_tokenmining_pretrain(_config(caption_manifest, vlm_weights, tmp_path / "on", max_steps=2, val_every=2))
    cfg = _config(caption_manifest, vlm_weights, tmp_path / "off", max_steps=2, val_every=2)
    cfg.features.mode = "online"
    decoded = run_tokenmining_pretrain(cfg)
    assert decoded.metrics["lm_loss_initial"] == pytest.approx(cached.metrics["lm_loss_initial"], abs=1e-5)
    assert decoded.metrics["lm_loss"] == pytest.approx(cached.metrics["lm_loss"], abs=1e-4)
    assert len(list((tmp_path / "on" / "features").glob("*/shard-*.safetensors"))) >= 1
    assert not (tmp_path / "off" / "features").exists()


def test_objective_gradients_reach_only_token_mining(caption_manifest, vlm_weights, tmp_path):
    from hilight.data.qa import VideoQADataset, encode_samples, read_qa_manifest

    config = _config(caption_manifest, vlm_weights, tmp_path)
    parts = build_vlm_parts(config.vision, config.llm, config.token_mining)
    freeze_all_but(parts.vlm, ("token_mining.",))
    rows = read_qa_manifest(caption_manifest).select(None, ["train"]).head(3)
    n = parts.vlm.token_mining.config.num_tokens(parts.num_frames)
    data = VideoQADataset(encode_samples(rows, parts.tokenizer, video_tokens=n, max_length=96),
                          pad_token_id=parts.tokenizer.pad_token_id, num_frames=parts.num_frames,
                          image_size=parts.image_size)
    batch = data.collate([0, 1, 2])
    assert batch["pixel_values"].shape[:2] == (3, parts.num_frames)
    VideoAnswerObjective(parts.vlm)(parts.vlm.token_mining, batch)["loss"].backward()
    with_grad = {n for n, p in parts.vlm.named_parameters() if p.grad is not None}
    assert with_grad and all(n.startswith("token_mining.") for n in with_grad)


def test_clear_errors(caption_manifest, vlm_weights, tmp_path):
    from pydantic import ValidationError

    raw = tokenmining_config(caption_manifest, tmp_path, vlm_weights["clipvip"], vlm_weights["llm"])
    with pytest.raises(ValidationError, match="exactly one of vision.longclip"):
        TokenMiningPretrainConfig.model_validate({**raw, "vision": {"clipvip": "x"}})
    from hilight.models.checkpoints import CheckpointError
    bad = TokenMiningPretrainConfig.model_validate({**raw, "llm": {"dir": str(tmp_path / "no_llm")}})
    with pytest.raises(CheckpointError, match="config.json is missing"):
        build_vlm_parts(bad.vision, bad.llm, bad.token_mining)
    small = TokenMiningPretrainConfig.model_validate({**raw, "data": {**raw["data"], "max_length": 20}})
    with pytest.raises(ValueError, match=r"QA samples were rejected, e.g. .*prompt alone.*raise data.max_length \(now 20\)"):
        run_tokenmining_pretrain(small)


def test_feature_cache_projects_its_size_and_refuses_a_full_disk(caption_manifest, vlm_weights, tmp_path,
                                                                 monkeypatch):
    import shutil

    from hilight.train import vlm_parts

    cfg = _config(caption_manifest, vlm_weights, tmp_path / "run", max_steps=2, val_every=2)
    # the projection is what the fill then writes (per clip, within the safetensors headers)
    parts = build_vlm_parts(cfg.vision, cfg.llm, cfg.token_mining)
    per_clip = vlm_parts.feature_bytes_per_clip(parts, torch.float32)
    result = run_tokenmining_pretrain(cfg)
    shards = list((tmp_path / "run" / "features").glob("*/shard-*.safetensors"))
    stored = sum(p.stat().st_size for p in shards)
    clips = result.samples["train"] + result.samples["val"]  # an upper bound on distinct clips
    assert per_clip > 0 and stored >= per_clip  # at least one clip's worth, and
    assert stored <= clips * per_clip * 1.1  # never more than the projection (+ headers)

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(vlm_parts.shutil, "disk_usage", lambda p: usage._replace(free=per_clip))  # one clip's room
    full = _config(caption_manifest, vlm_weights, tmp_path / "full", max_steps=2, val_every=2)
    with pytest.raises(vlm_parts.FeatureCacheSpaceError, match=r"features.mode: online.*larger disk") as err:
        run_tokenmining_pretrain(full)
    assert "GiB free" in str(err.value)
    assert not list((tmp_path / "full" / "features").glob("*/shard-*"))  # refused before computing anything


def test_feature_cache_key_changes_with_tower_settings_code_and_libraries(caption_manifest, vlm_weights, tmp_path,
                                                                         monkeypatch):
    from hilight.data.feature_cache import FeatureCache
    from hilight.train import vlm_parts

    cfg = _config(caption_manifest, vlm_weights, tmp_path / "run")
    parts = build_vlm_parts(cfg.vision, cfg.llm, cfg.token_mining)
    key = vlm_parts.feature_cache_key(parts)
    assert key == vlm_parts.feature_cache_key(build_vlm_parts(cfg.vision, cfg.llm, cfg.token_mining))  # stable
    assert key["packages"]["torch"] == torch.__version__ and len(key["code"]) == 64
    home = FeatureCache(tmp_path / "features", key).dir

    # an upgraded library, an edited tower or decoder, a tower setting that no weight shape shows: another cache
    monkeypatch.setattr(vlm_parts, "package_versions", lambda: {**key["packages"], "torch": "99.0"})
    upgraded = vlm_parts.feature_cache_key(parts)
    monkeypatch.undo()
    monkeypatch.setattr(vlm_parts, "FEATURE_CODE", (*vlm_parts.FEATURE_CODE, _ClipDataset))
    edited = vlm_parts.feature_cache_key(parts)
    monkeypatch.undo()
    parts.vlm.clipvip.config.vision.layer_norm_eps *= 10
    retuned = vlm_parts.feature_cache_key(parts)
    dirs = {FeatureCache(tmp_path / "features", k).dir for k in (upgraded, edited, retuned)}
    assert len(dirs) == 3 and home not in dirs


def test_source_digest_follows_edits_of_the_file(tmp_path):
    import importlib.util

    from hilight.env import source_digest

    def load(text: str):
        path = tmp_path / "tower_code.py"
        path.write_text(text)
        spec = importlib.util.spec_from_file_location("tower_code", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    before = load("def forward(x):\n    return x * 2\n\n\ndef other():\n    return 0\n")
    digest, forward = source_digest(before), source_digest(before.forward)
    after = load("def forward(x):\n    return x * 30\n\n\ndef other():\n    return 0\n")
    assert source_digest(after) != digest and source_digest(after.forward) != forward
    assert source_digest(after.other) == source_digest(before.other)  # only what changed counts


class _ClipDataset:
    """Held-out samples whose 'video' is their clip's number: enough for answer_loss to run without a model."""

    with_video = True

    def __init__(self, clips: list[int]):
        import pandas as pd

        self.clips = clips
        self.rows = pd.DataFrame({"video_sha256": [f"sha{c}" for c in clips]})

    def __len__(self) -> int:
        return len(self.clips)

    def collate(self, index: list[int]) -> dict[str, torch.Tensor]:
        ids = torch.tensor(index)[:, None]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids,
                "video_features": torch.tensor([float(self.clips[i]) for i in index])[:, None, None],
                "frame_features": torch.zeros(len(index), 1, 1)}


class _ClipVLM(torch.nn.Module):
    """token_loss = how many samples of the batch were shown their own clip."""

    def __init__(self, clips: list[int]):
        super().__init__()
        self.clips = clips
        self.token_mining = _PassVideo()

    def token_loss(self, input_ids, attention_mask, labels, tokens):
        own = torch.tensor([float(self.clips[i]) for i in input_ids[:, 0].tolist()])
        return float((tokens[:, 0, 0] == own).sum()), len(own)


class _PassVideo(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, video, frames):
        return video


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_the_wrong_video_control_never_shows_a_sample_its_own_clip(batch_size):
    from hilight.train.vlm_parts import answer_loss, other_clip_index

    clips = [0, 0, 1, 2, 2, 2, 3, 4, 5, 5]  # neighbouring samples of one clip, as several QA of one video are
    data, vlm = _ClipDataset(clips), _ClipVLM(clips)
    assert answer_loss(vlm, data, batch_size) == 1.0  # the control's measure: 1 = every sample saw its own clip
    assert answer_loss(vlm, data, batch_size, shuffle_video=True) == 0.0  # (a batch of 1 used to see its own)
    wrong = other_clip_index([f"sha{c}" for c in clips])
    assert wrong == other_clip_index([f"sha{c}" for c in clips])  # fixed, so checkpoints are compared alike
    assert all(clips[j] != clips[i] for i, j in enumerate(wrong)) and len(set(wrong)) > 3
    with pytest.raises(ValueError, match="2 or more clips, got 1"):
        other_clip_index(["sha0"] * 3)


class _GlobalLook(torch.nn.Module):
    """TokenMining stand-in with 2 query tokens over 5 CLIP-ViP tokens (2 of them CLS + proxies): query 0 puts
    clip/10 of its attention on those two, evenly, the rest on the other three; query 1 looks only at the others."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def attention(self, video, frames):
        share = video[:, 0, 0] / 10  # the clip number
        q0 = torch.stack([share / 2, share / 2, *(((1 - share) / 3,) * 3)], -1)
        q1 = torch.tensor([0.0, 0.0, 1 / 3, 1 / 3, 1 / 3]).expand_as(q0)
        return torch.stack([q0, q1], 1)  # [B, 2, 5]


def test_attention_summary_counts_each_clip_once():
    from types import SimpleNamespace

    from hilight.train.vlm_parts import attention_summary

    clips = [0, 0, 1, 2, 2, 2]  # several QA samples of one clip: the summary is over clips
    vlm = SimpleNamespace(token_mining=_GlobalLook())
    got = attention_summary(vlm, _ClipDataset(clips), batch_size=4, num_proxies=2)
    assert got["global_mass_max"] == pytest.approx((0 + 0.1 + 0.2) / 3)  # per sample it would be 0.117
    assert got["global_mass"] == pytest.approx(0.1 / 2)  # query 1 puts nothing there
    assert got["global_mass_uniform"] == pytest.approx(2 / 5)

    def entropy(p):
        return -sum(x * math.log(x) for x in p if x > 0) / math.log(5)

    per_clip = [(entropy([s / 2, s / 2] + [(1 - s) / 3] * 3) + entropy([1 / 3] * 3)) / 2 for s in (0, 0.1, 0.2)]
    assert got["entropy"] == pytest.approx(sum(per_clip) / 3)
