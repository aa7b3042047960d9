"""Stage 2 (LoRA), the merge and the standalone model directory, on tiny models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from hilight.data.samplers import MixtureBatchSampler
from tests.conftest import lora_config


def test_lora_at_gemma_2b_shapes_has_the_reference_trainable_count():
    """126 target modules and 78,446,592 LoRA parameters, the count train_GPUs_lora.py printed (reference §4.3)."""
    from peft import LoraConfig, get_peft_model
    from transformers import GemmaForCausalLM

    from hilight.models.vlm import gemma_config
    from hilight.train.lora import LORA_TARGETS, LoRASpec

    spec = LoRASpec()
    assert (spec.r, spec.alpha, spec.dropout, spec.target_modules) == (64, 32, 0.05, LORA_TARGETS)
    with torch.device("meta"):
        llm = GemmaForCausalLM(gemma_config("gemma-2b"))
    peft = get_peft_model(llm, LoraConfig(r=spec.r, lora_alpha=spec.alpha, target_modules=spec.target_modules,
                                          task_type="CAUSAL_LM"))
    assert sum(p.numel() for p in peft.parameters() if p.requires_grad) == 78_446_592
    assert sum(1 for n, _ in peft.named_modules() if n.endswith(tuple(LORA_TARGETS))) == 126


def test_mixture_sampler_ratios_sequence_and_resume():
    a, b = list(range(0, 10)), list(range(10, 14))
    mix = MixtureBatchSampler([a, b], [1.0, 2.0], batch_size=3, mode="mix", seed=1)
    order = mix.order()
    assert sorted(order[order < 10].tolist()) == a and np.bincount(order[order >= 10] - 10).tolist() == [2, 2, 2, 2]
    assert len(mix) == 18 // 3
    half = MixtureBatchSampler([a, b], [0.5, 1.0], batch_size=1, seed=1)
    assert len(set(half.order()[:0].tolist())) == 0 and (half.order() < 10).sum() == 5
    seq = MixtureBatchSampler([a, b], [1.0, 1.0], batch_size=2, mode="sequence", seed=1)
    assert set(seq.order()[:10].tolist()) == set(a) and set(seq.order()[10:].tolist()) == set(b)
    full = list(mix)
    mix.set_epoch(0, skip=2)
    assert list(mix) == full[2:]
    mix.set_epoch(1)
    assert list(mix) != full  # a new shuffle each epoch, reproducible from (seed, epoch)
    with pytest.raises(ValueError, match="ratios must be > 0"):
        MixtureBatchSampler([a], [0.0], batch_size=1)
    with pytest.raises(ValueError, match="one ratio per source"):
        MixtureBatchSampler([a, b], [1.0], batch_size=1)


def test_sequence_mode_stages_the_whole_run_not_each_epoch():
    a, b, c = list(range(0, 10)), list(range(10, 14)), list(range(14, 20))
    # one epoch is 10 + 8 + 6 = 24 samples; the run draws 30 batches of 4 = 120, five epochs' worth
    seq = MixtureBatchSampler([a, b, c], [1.0, 2.0, 1.0], batch_size=4, mode="sequence", seed=3, run_batches=30)
    assert len(seq) == 30
    source = np.digitize(seq.order(), [10, 14])  # 0, 1, 2 per sample
    # each source once, its ratio's share (10:8:6) of the 30 batches in whole batches: 12.5 / 10 / 7.5 -> 12 / 10 / 8
    assert source.tolist() == [0] * 48 + [1] * 40 + [2] * 32
    order = seq.order()
    assert sorted(np.bincount(order[:48]).tolist(), reverse=True) == [5] * 8 + [4] * 2  # 4.8 shuffled passes over a
    assert sorted(order[:10].tolist()) == a and order[:10].tolist() != order[10:20].tolist()
    # short runs still reach every source; mix is per epoch whatever the run
    short = MixtureBatchSampler([a, b, c], [1.0, 2.0, 1.0], batch_size=4, mode="sequence", seed=3, run_batches=3)
    assert np.bincount(np.digitize(short.order(), [10, 14])).tolist() == [4, 4, 4]
    mix = MixtureBatchSampler([a, b, c], [1.0, 2.0, 1.0], batch_size=4, mode="mix", seed=3, run_batches=30)
    assert len(mix) == 6 and mix.order().tolist() == MixtureBatchSampler([a, b, c], [1.0, 2.0, 1.0], 4, seed=3).order().tolist()
    with pytest.raises(ValueError, match="run_batches must be >= 1"):
        MixtureBatchSampler([a], [1.0], batch_size=1, mode="sequence", run_batches=0)
    # a source too small for a whole batch of a short run: refused by name, not silently left out
    big, tiny = list(range(100)), [100, 101]
    with pytest.raises(ValueError, match=r"source 'general/qa' \(2 samples per epoch\) would get no batch of the "
                                         r"run's 10 in sequence mode.* raise its ratio or train.max_steps"):
        MixtureBatchSampler([big, tiny], [1.0, 1.0], batch_size=4, mode="sequence", run_batches=10,
                            names=["billiards/qa", "general/qa"])
    assert len(MixtureBatchSampler([big, tiny], [1.0, 10.0], batch_size=4, mode="sequence", run_batches=10)) == 10


def test_group_by_length_rebatches_the_same_samples_by_length():
    rng = np.random.default_rng(0)
    a, b = list(range(0, 300)), list(range(300, 420))
    lengths = rng.integers(20, 400, size=420)
    kw = {"batch_size": 8, "seed": 5}
    plain = MixtureBatchSampler([a, b], [1.0, 2.0], **kw)
    grouped = MixtureBatchSampler([a, b], [1.0, 2.0], lengths=lengths, **kw)
    assert len(grouped) == len(plain) and sorted(grouped.order()) == sorted(plain.order())  # the same samples

    def padded(sampler):  # tokens a step computes: each batch padded to its longest sample
        return sum(len(x) * lengths[x].max() for x in sampler)

    assert padded(grouped) < 0.75 * padded(plain)
    assert list(grouped) == list(MixtureBatchSampler([a, b], [1.0, 2.0], lengths=lengths, **kw))  # (seed, epoch) fix it
    full = list(grouped)
    grouped.set_epoch(0, skip=3)
    assert list(grouped) == full[3:]
    grouped.set_epoch(1)
    assert list(grouped) != full
    # sequence: still staged, every batch from one source, each source's share grouped on its own
    seq = MixtureBatchSampler([a, b], [1.0, 1.0], mode="sequence", lengths=lengths, run_batches=52, **kw)
    sources = [np.digitize(x, [300]).tolist() for x in seq]
    assert sources == [[0] * 8] * 37 + [[1] * 8] * 15  # 300 : 120 samples of the 52 batches
    assert padded(seq) < 0.75 * padded(MixtureBatchSampler([a, b], [1.0, 1.0], mode="sequence", run_batches=52, **kw))
    with pytest.raises(ValueError, match="one length per sample"):
        MixtureBatchSampler([a, b], [1.0, 1.0], lengths=lengths[:100], **kw)
    with pytest.raises(ValueError, match="needs run_batches"):
        MixtureBatchSampler([a, b], [1.0, 1.0], mode="sequence", lengths=lengths, **kw)


def test_a_source_without_a_held_out_split_holds_out_videos_by_content(caption_manifest):
    """QA-only sets (VideoInstruct-100K) give every row split "train": ``holdout`` carves their validation videos out
    by content hash instead, disjoint from training, and the same whichever other videos the set holds."""
    from hilight.data.qa import read_qa_manifest
    from hilight.train.lora import MixtureDataSpec, held_out, source_rows

    spec = MixtureDataSpec.model_validate({"manifest_dir": str(caption_manifest), "val_splits": ["no-such-split"],
                                           "sources": [{"dataset": "billiards", "kind": "qa", "holdout": 0.3},
                                                       {"dataset": "general", "kind": "describe", "holdout": 0.3}]})
    train, val = source_rows(spec, "train"), source_rows(spec, "val")
    every = read_qa_manifest(caption_manifest).select(["billiards"], ["train"])
    for t, v in zip(train, val, strict=True):
        assert len(t) and len(v) and not set(t["video_sha256"]) & set(v["video_sha256"])
    assert sorted(train[0]["id"].tolist() + val[0]["id"].tolist()) == sorted(every["id"].tolist())  # nothing lost
    n = every["video_sha256"].nunique()
    assert 0.1 * n < val[0]["video_sha256"].nunique() < 0.5 * n  # about 30% of its videos
    # a video is held out when the first 32 bits of its content hash fall below the share
    assert held_out(pd.Series(["4ccccccc" + "0" * 56, "4ccccccd" + "0" * 56]), 0.3).tolist() == [True, False]
    with pytest.raises(ValueError, match=r"of one dataset hold out different shares: \{'billiards': \[0.3, None\]\}"):
        MixtureDataSpec.model_validate({"sources": [{"dataset": "billiards", "kind": "qa", "holdout": 0.3},
                                                    {"dataset": "billiards", "kind": "describe"}]})
    # a source without holdout still reads data.val_splits
    plain = spec.model_copy(update={"val_splits": ["val", "test"], "sources": [
        spec.sources[0].model_copy(update={"holdout": None})]})
    assert set(source_rows(plain, "val")[0]["split"]) <= {"val", "test"}
    with pytest.raises(ValueError, match=r"source billiards/qa: holdout 1e-09 leaves no val videos of \d+"):
        source_rows(spec.model_copy(update={"sources": [spec.sources[0].model_copy(update={"holdout": 1e-9})]}), "val")


def test_stage2_requires_the_stage1_token_mining(caption_manifest, vlm_weights, tmp_path):
    from pydantic import ValidationError

    from hilight.train.lora import LoRAFinetuneConfig

    raw = lora_config(caption_manifest, tmp_path, vlm_weights["clipvip"], vlm_weights["llm"], "x")
    raw["token_mining"].pop("init")
    with pytest.raises(ValidationError, match="token_mining.init is required"):
        LoRAFinetuneConfig.model_validate(raw)


@pytest.fixture(scope="module")
def stage2(tmp_path_factory, caption_manifest, vlm_weights, stage1_export):
    from hilight.train.lora import LoRAFinetuneConfig, run_lora_finetune

    out = tmp_path_factory.mktemp("stage2")
    cfg = LoRAFinetuneConfig.model_validate(
        lora_config(caption_manifest, out, vlm_weights["clipvip"], vlm_weights["llm"], stage1_export))
    return cfg, run_lora_finetune(cfg)


def test_stage2_trains_adapters_and_token_mining_only(stage2, stage1_export):
    cfg, result = stage2
    m = result.metrics
    assert m["lm_loss"] < m["lm_loss_initial"]
    assert {"lm_loss/billiards/qa", "lm_loss/billiards/describe", "lm_loss/general/qa"} <= set(m)
    # the wrong-video control per source: the loss with another clip's video minus the loss with the clip's own
    gains = {k: v for k, v in m.items() if k.startswith("video_gain/")}
    # (the tiny manifest's held-out general QA shows a single clip: no other clip to show, so no control)
    assert set(gains) == {"video_gain/billiards/qa", "video_gain/billiards/describe"}
    assert all(math.isfinite(v) and v != 0.0 for v in gains.values())
    # where TokenMining looks (each clip once): a share of its attention on CLIP-ViP's CLS + proxy tokens
    assert 0 < m["tm_attention/global_mass"] <= m["tm_attention/global_mass_max"] < 1
    assert 0 < m["tm_attention/entropy"] <= 1
    assert result.samples["train/general/qa"] > 0 and result.samples["train/billiards/describe"] > 0
    # checkpoints hold the trainable tensors only: LoRA matrices + TokenMining (tuned), never the base LLM
    keys = set(load_file(result.fit.final_checkpoint / "model.safetensors"))
    assert keys and all("lora_" in k or k.startswith("token_mining.") for k in keys)
    assert any(k.startswith("token_mining.") for k in keys) and any("lora_A" in k for k in keys)
    # the export: peft adapter + the TokenMining it was trained with + the specs to rebuild the model
    best = result.best_dir
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (best / "adapter").iterdir()}
    meta = json.loads((best / "stage2.json").read_text())
    assert meta["lora"]["r"] == 4 and meta["digests"]["token_mining_init"]
    tuned = load_file(best / "token_mining" / "model.safetensors")
    init = load_file(stage1_export / "model.safetensors")
    assert any(not torch.equal(tuned[k], init[k]) for k in init)  # TokenMining was tuned


def test_stage2_resumes_instead_of_retraining(stage2):
    from hilight.train.lora import run_lora_finetune

    cfg, first = stage2
    again = run_lora_finetune(cfg)
    assert again.run_dir == first.run_dir and again.fit.resumed_from == cfg.train.max_steps
    assert again.metrics["lm_loss"] == pytest.approx(first.metrics["lm_loss"], abs=1e-6)


def test_frozen_token_mining_is_exported_unchanged(tmp_path, caption_manifest, vlm_weights, stage1_export):
    from hilight.train.lora import LoRAFinetuneConfig, run_lora_finetune

    raw = lora_config(caption_manifest, tmp_path, vlm_weights["clipvip"], vlm_weights["llm"], stage1_export, max_steps=2,
                      val_every=2, ckpt_every=2)
    raw["lora"]["tune_token_mining"] = False
    result = run_lora_finetune(LoRAFinetuneConfig.model_validate(raw))
    keys = set(load_file(result.fit.final_checkpoint / "model.safetensors"))
    assert keys and all("lora_" in k for k in keys)
    exported = load_file(result.best_dir / "token_mining" / "model.safetensors")
    init = load_file(stage1_export / "model.safetensors")
    assert all(torch.equal(exported[k], init[k]) for k in init)


def test_stage2_sequence_mode_stages_the_run_and_groups_by_length(tmp_path, caption_manifest, vlm_weights,
                                                                   stage1_export, monkeypatch):
    """The recipe hands the sampler the run's length: every training batch comes from one source, the sources in
    their listed order, and the sampler holds exactly the run's batches."""
    import hilight.train.lora as lora

    made = []

    class Recording(lora.MixtureBatchSampler):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(lora, "MixtureBatchSampler", Recording)
    raw = lora_config(caption_manifest, tmp_path, vlm_weights["clipvip"], vlm_weights["llm"], stage1_export, max_steps=8,
                      val_every=8, ckpt_every=8)
    raw["data"].update(mode="sequence", group_by_length=True)
    result = lora.run_lora_finetune(lora.LoRAFinetuneConfig.model_validate(raw))
    (sampler,) = made
    assert result.fit.step == 8 and len(sampler) == 8 and sampler.lengths is not None
    source_of = {int(i): k for k, src in enumerate(sampler.sources) for i in src}
    sampler.set_epoch(0)
    per_batch = [{source_of[i] for i in batch} for batch in sampler]
    assert all(len(s) == 1 for s in per_batch)  # no batch spans two sources
    order = [s.pop() for s in per_batch]
    assert order == sorted(order) and len(set(order)) > 1  # staged: each source's share in turn


def test_merge_keeps_logits_and_the_directory_loads_back(stage2, tmp_path):
    from peft import PeftModel

    from hilight.models.checkpoints import CheckpointError
    from hilight.models.export import GenerationSpec, load_vlm_dir
    from hilight.train.merge import merge_stage2, probe_logits
    from hilight.train.vlm_parts import LLMSpec, TokenMiningSpec, VisionSpec, build_vlm_parts

    _, result = stage2
    merged = merge_stage2(result.best_dir, tmp_path / "merged", generation=GenerationSpec(max_new_tokens=8),
                          prompt="What's happened in this video?")
    assert merged.max_abs_logit_diff < 1e-4
    # independently: the adapter model (peft, unmerged) and the saved merged directory give the same logits
    meta = json.loads((result.best_dir / "stage2.json").read_text())
    parts = build_vlm_parts(VisionSpec(**meta["vision"]), LLMSpec(**meta["llm"]),
                               TokenMiningSpec(**{**meta["token_mining"], "init": str(result.best_dir / "token_mining")}))
    vlm = parts.vlm.eval()
    vocab, n_tok = vlm.llm.config.vocab_size, vlm.token_mining.config.num_tokens(parts.num_frames)
    base_logits = probe_logits(vlm, vocab, n_tok)
    vlm.llm = PeftModel.from_pretrained(vlm.llm, str(result.best_dir / "adapter")).eval()
    unmerged = probe_logits(vlm, vocab, n_tok)
    bundle = load_vlm_dir(merged.out_dir)
    reloaded = probe_logits(bundle.vlm, vocab, n_tok)
    assert torch.allclose(unmerged, reloaded, atol=1e-4)
    assert not torch.allclose(base_logits, unmerged, atol=1e-4)  # the adapter does change the model
    files = {str(p.relative_to(merged.out_dir)) for p in merged.out_dir.rglob("*") if p.is_file()}
    assert {"hilight.json", "llm/config.json", "llm/model.safetensors", "llm/tokenizer.json",
            "token_mining/model.safetensors", "vision/clipvip/model.safetensors",
            "vision/longclip/model.safetensors"} <= files
    assert bundle.meta["generation"]["max_new_tokens"] == 8 and bundle.meta["video_tokens"] == n_tok
    # same prompt, same settings, same answer (sampling is seeded)
    clip = torch.randn(1, bundle.num_frames, 3, bundle.image_size, bundle.image_size)
    first = bundle.generate(["What's happened in this video?"], pixel_values=clip)
    assert first == bundle.generate(["What's happened in this video?"], pixel_values=clip)
    # a modified part is caught by its digest
    tm = merged.out_dir / "token_mining" / "model.safetensors"
    sd = load_file(tm)
    from safetensors.torch import save_file

    key = next(iter(sd))
    sd[key] = sd[key] + 1
    save_file(sd, tm)
    with pytest.raises(CheckpointError, match="token_mining"):
        load_vlm_dir(merged.out_dir)


def test_merge_refuses_changed_base_weights(stage2, tmp_path):
    import shutil

    from hilight.models.checkpoints import CheckpointError
    from hilight.models.export import GenerationSpec
    from hilight.train.merge import merge_stage2

    _, result = stage2
    copy = tmp_path / "stage2"
    shutil.copytree(result.best_dir, copy)
    meta = json.loads((copy / "stage2.json").read_text())
    meta["digests"]["clipvip"] = "0" * 64
    (copy / "stage2.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="clipvip"):
        merge_stage2(copy, tmp_path / "merged", generation=GenerationSpec(), prompt="q")
    assert not (tmp_path / "merged").exists()


def _bf16_export(result, root: Path) -> Path:
    """The stage-2 export as if the LLM had run in bf16 (the real config's dtype): same adapter, LLM digest of the
    bf16 weights."""
    import shutil

    from hilight.models.checkpoints import module_digest
    from hilight.models.vlm import load_llm

    copy = root / "stage2_bf16"
    shutil.copytree(result.best_dir, copy)
    meta = json.loads((copy / "stage2.json").read_text())
    meta["llm"]["dtype"] = "bfloat16"
    llm = load_llm(Path(meta["llm"]["dir"]), hidden_act=meta["llm"]["hidden_act"], dtype=torch.bfloat16)
    meta["digests"]["llm"] = module_digest(llm)
    (copy / "stage2.json").write_text(json.dumps(meta))
    return copy


def test_bf16_merge_folds_in_float32_and_passes_its_check(stage2, tmp_path):
    from hilight.models.export import GenerationSpec, read_meta
    from hilight.train.merge import MERGE_TOLERANCE, merge_stage2

    _, result = stage2
    merged = merge_stage2(_bf16_export(result, tmp_path), tmp_path / "merged", generation=GenerationSpec(),
                          prompt="q", device="cpu")
    assert merged.max_abs_logit_diff < MERGE_TOLERANCE
    assert read_meta(merged.out_dir)["dtype"] == "bfloat16"  # saved in the LLM's dtype after the float32 check


def test_corrupted_merge_fails_its_check(stage2, tmp_path, monkeypatch):
    from peft.tuners.lora import LoraModel

    from hilight.models.export import GenerationSpec
    from hilight.train.merge import merge_stage2

    fold = LoraModel.merge_and_unload

    def corrupted(self, *args, **kwargs):
        model = fold(self, *args, **kwargs)
        with torch.no_grad():  # one tensor off by a little: a wrong fold of one module
            model.model.layers[0].mlp.down_proj.weight.add_(1e-2)
        return model

    monkeypatch.setattr(LoraModel, "merge_and_unload", corrupted)
    _, result = stage2
    with pytest.raises(RuntimeError, match="merge is wrong"):
        merge_stage2(_bf16_export(result, tmp_path), tmp_path / "merged", generation=GenerationSpec(), prompt="q",
                     device="cpu")
    assert not (tmp_path / "merged").exists()


def test_modules_to_save_trains_the_mlp_in_full_and_merges(tmp_path, caption_manifest, vlm_weights, stage1_export):
    """``lora.modules_to_save: [mlp]`` with attention-only targets: the MLPs are trained as full copies, checkpointed
    with the adapters, and the merge swaps them in (logits kept); a module both adapted and saved is refused."""
    from pydantic import ValidationError

    from hilight.models.export import GenerationSpec, load_vlm_dir
    from hilight.train.lora import LoRAFinetuneConfig, run_lora_finetune
    from hilight.train.merge import merge_stage2

    raw = lora_config(caption_manifest, tmp_path, vlm_weights["clipvip"], vlm_weights["llm"], stage1_export, max_steps=2,
                      val_every=2, ckpt_every=2)
    raw["lora"].update(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], modules_to_save=["mlp"],
                       tune_token_mining=False)
    result = run_lora_finetune(LoRAFinetuneConfig.model_validate(raw))
    keys = set(load_file(result.fit.final_checkpoint / "model.safetensors"))
    n_layers = json.loads((vlm_weights["llm"] / "config.json").read_text())["num_hidden_layers"]
    saved = {k for k in keys if ".mlp.modules_to_save." in k}
    assert len(saved) == 3 * n_layers  # gate/up/down weights of every block
    assert keys - saved and all("lora_" in k for k in keys - saved)
    assert not any("mlp" in k and "lora_" in k for k in keys)  # the MLP is not also adapted

    merged = merge_stage2(result.best_dir, tmp_path / "merged", generation=GenerationSpec(), prompt="q")
    assert merged.max_abs_logit_diff < 1e-4
    base = load_file(vlm_weights["llm"] / "model.safetensors")
    llm = load_vlm_dir(merged.out_dir).vlm.llm.state_dict()
    assert not any("modules_to_save" in k or "lora_" in k for k in llm)  # plain Gemma keys after the merge
    mlp = [k for k in base if ".mlp." in k]
    attention = [k for k in base if ".self_attn." in k]  # adapted: changed by the merge
    assert mlp and all(torch.equal(llm[k], base[k]) for k in base if k not in mlp + attention)
    assert any(not torch.equal(llm[k], base[k]) for k in mlp)  # the trained MLPs are what the merge kept

    raw["lora"]["target_modules"] = ["q_proj", "down_proj"]
    with pytest.raises(ValidationError, match=r"modules_to_save \['mlp'\] contain.*down_proj"):
        LoRAFinetuneConfig.model_validate(raw)


def test_a_module_to_save_that_matches_nothing_is_an_error(caption_manifest, vlm_weights, stage1_export, tmp_path):
    from hilight.train.lora import LoRAFinetuneConfig, LoRASpec, apply_lora
    from hilight.train.vlm_parts import build_vlm_parts

    cfg = LoRAFinetuneConfig.model_validate(
        lora_config(caption_manifest, tmp_path, vlm_weights["clipvip"], vlm_weights["llm"], stage1_export))
    vlm = build_vlm_parts(cfg.vision, cfg.llm, cfg.token_mining).vlm
    with pytest.raises(RuntimeError, match=r"no module named \['feed_forward'\].*lora.modules_to_save"):
        apply_lora(vlm, LoRASpec(target_modules=["q_proj"], modules_to_save=["feed_forward"]), seed=0)
