"""Stage 2: LoRA tuning of the LLM on video instructions, the stage-1 TokenMining loaded and optionally unfrozen
(hilight-reference §4.3; research notes §4.2, §7).

``LoRARecipe(config).run()`` reads top to bottom: data (QA and "describe the video" samples of each source) →
the frozen towers, the LLM and the **stage-1** TokenMining (required: the reference's stage-2 script forgot to load
it and tuned LoRA on a random TokenMining, bug §6.2) → peft LoRA on the LLM (r 64, alpha 32, dropout 0.05 on
q/k/v/o/gate/up/down, the reference's 126 modules at Gemma-2B shapes) and, with ``lora.tune_token_mining``, a
trainable TokenMining (the notes' "tune TM+LLM" variant, which the reference code could not train: PEFT froze it)
→ feature cache → training over the sources mixed by ratio or in sequence → exports.

Checkpoints hold only the trainable tensors (adapters, ``lora.modules_to_save`` copies, plus TokenMining when
tuned), so a Gemma-2B run with adapters only writes ~300 MB per checkpoint, not 10 GB. An export
(``<output_dir>/best``) is what the merge step reads:

    adapter/          peft adapter (adapter_config.json + adapter_model.safetensors, the reference's stage-2 layout)
    token_mining/     the TokenMining the adapter was trained with (tuned or the stage-1 weights), so the merge
                      cannot pair the adapter with another TokenMining (reference bug §6.2)
    stage2.json       the vision / LLM / TokenMining specs and weight digests needed to rebuild the model
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
import torch
from peft import LoraConfig, get_peft_model
from pydantic import BaseModel, ConfigDict, Field, model_validator

from hilight.data.captions import read_caption_manifest
from hilight.data.qa import (
    DESCRIBE_PROMPT,
    ChainedSamples,
    EncodedSet,
    VideoQADataset,
    describe_rows,
    encode_samples,
    read_qa_manifest,
)
from hilight.data.samplers import MixtureBatchSampler
from hilight.models.checkpoints import module_digest, replace_dir
from hilight.models.token_mining import save_token_mining
from hilight.tracking import ResilientTracker
from hilight.train.loop import FitResult, TrackingSpec, TrainSettings
from hilight.train.recipe import Recipe, lm_objective
from hilight.train.vlm_parts import (
    FeatureCacheSpec,
    LLMSpec,
    TokenMiningSpec,
    Tokenize,
    VisionSpec,
    answer_loss,
    attention_summary,
    build_vlm_parts,
    cache_tower_features,
    encode_training_set,
)

log = logging.getLogger(__name__)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# the Gemma/Llama block that holds each LoRA target, so that lora.modules_to_save cannot wrap a module twice
LORA_PARENTS = {**dict.fromkeys(["q_proj", "k_proj", "v_proj", "o_proj"], ("self_attn",)),
                **dict.fromkeys(["gate_proj", "up_proj", "down_proj"], ("mlp",))}
STAGE2_FILE = "stage2.json"


class SourceSpec(BaseModel):
    """One training source: a dataset's QA conversations, or its captions turned into "describe" samples."""

    model_config = ConfigDict(extra="forbid")

    dataset: str
    kind: Literal["qa", "describe"] = "qa"
    ratio: float = Field(1.0, gt=0)  # samples per epoch = ratio x the source's size (sequence: its share of the run)
    # for a source the manifest gives no held-out split (QA-only sets such as VideoInstruct-100K: every row is
    # "train"): hold out this share of its training videos instead, by content hash (a video is held out when the
    # first 32 bits of its SHA-256 fall below the share). Disjoint from training, the same videos at every run, and
    # stable as data is added. Replaces data.val_splits for this source.
    holdout: float | None = Field(None, gt=0, lt=1)

    @property
    def label(self) -> str:
        return f"{self.dataset}/{self.kind}"


class MixtureDataSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    manifest_dir: str = "outputs/data_validation"
    sources: list[SourceSpec] = Field(min_length=1)
    mode: Literal["mix", "sequence"] = "mix"  # mix: one shuffled pool ("Mix101K"); sequence: source by source, each
    # source's ratio share of the whole run in turn (not per epoch: MixtureBatchSampler's run_batches)
    train_splits: list[str] = ["train"]
    val_splits: list[str] = ["val", "test"]
    describe_prompt: str = DESCRIBE_PROMPT
    max_length: int = Field(1024, ge=16)
    max_val_samples: int | None = Field(256, ge=1)  # per source
    tokenize: Tokenize = "lazy"  # training samples: encoded on first use, or "upfront" (as stage 1)
    memo_tokens: bool = False  # keep lazy encodings in <run_dir>/tokens.sqlite
    # batch conversations of similar length together (by characters, so lazy and upfront batch alike): less
    # padding per step, at the price of batches less random in length (MixtureBatchSampler's lengths)
    group_by_length: bool = False

    @model_validator(mode="after")
    def _unique(self) -> MixtureDataSpec:
        labels = [s.label for s in self.sources]
        if len(set(labels)) != len(labels):
            raise ValueError(f"data.sources lists a (dataset, kind) twice: {labels}")
        holdouts: dict[str, set] = {}
        for s in self.sources:
            holdouts.setdefault(s.dataset, set()).add(s.holdout)
        mixed = {d: sorted(h, key=str) for d, h in holdouts.items() if len(h) > 1}
        if mixed:  # its qa source would train on the videos its describe source holds out, or the reverse
            raise ValueError(f"data.sources of one dataset hold out different shares: {mixed}; give every source of "
                             "that dataset the same holdout")
        return self


class LoRASpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: int = Field(64, ge=1)
    alpha: int = Field(32, ge=1)  # scaling alpha / r = 0.5, as the reference
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGETS))
    # LLM modules trained in full instead of through adapters (peft's modules_to_save: a trainable copy of each
    # matching module, saved with the adapter and swapped in by the merge), e.g. [mlp] with attention-only targets
    modules_to_save: list[str] = Field(default_factory=list)
    tune_token_mining: bool = False  # the notes' "tune TM+LLM" variant

    @model_validator(mode="after")
    def _disjoint(self) -> LoRASpec:
        both = [m for m in self.modules_to_save
                if any(t == m or t.startswith(m + ".") or m in LORA_PARENTS.get(t, ()) for t in self.target_modules)]
        if both:
            raise ValueError(f"lora.modules_to_save {both} contain(s) LoRA targets {self.target_modules}: a module is "
                             "either adapted or trained in full; drop the inner names from lora.target_modules "
                             "(e.g. targets [q_proj, k_proj, v_proj, o_proj] with modules_to_save [mlp])")
        return self

    def describe(self) -> str:
        """What stage 2 trains, for logs and estimates: ``LoRA r16/alpha32 + full mlp + TokenMining``."""
        full = "".join(f" + full {m}" for m in self.modules_to_save)
        return f"LoRA r{self.r}/alpha{self.alpha}{full}" + (" + TokenMining" if self.tune_token_mining else "")


class LoRAFinetuneConfig(BaseModel):
    """Config of the ``lora_finetune`` pipeline (``configs/lora_*.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    pipeline: Literal["lora_finetune"] = "lora_finetune"
    experiment_name: str = "lora_finetune"
    name: str = Field("lora", pattern=r"^[A-Za-z0-9_.-]+$")
    output_dir: str = "outputs/lora"
    data: MixtureDataSpec
    vision: VisionSpec
    llm: LLMSpec
    token_mining: TokenMiningSpec
    lora: LoRASpec = Field(default_factory=LoRASpec)
    features: FeatureCacheSpec = Field(default_factory=FeatureCacheSpec)
    eval_batch_size: int = Field(16, ge=1)
    train: TrainSettings
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    enable_cache: bool = True

    @model_validator(mode="after")
    def _stage1_weights(self) -> LoRAFinetuneConfig:
        if self.token_mining.init is None:
            raise ValueError("token_mining.init is required: stage 2 starts from the stage-1 TokenMining (an export "
                             "dir such as outputs/tokenmining/best, or a token_mining.bin). Tuning LoRA on a random "
                             "TokenMining is the reference's stage-2 bug")
        return self


@dataclass
class Stage2Result:
    run_dir: Path
    best_dir: Path
    final_dir: Path
    fit: FitResult
    metrics: dict[str, float]  # held-out answer loss before / after, per source
    samples: dict[str, int]
    rejected: pd.DataFrame


# ------------------------------------------------------------------------------------------------ data


def source_rows(spec: MixtureDataSpec, role: Literal["train", "val"]) -> list[pd.DataFrame]:
    """Rows (QA-manifest format) of each source for training or validation, in ``spec.sources`` order: those of
    ``data.train_splits`` / ``data.val_splits``, or for a source with ``holdout`` its training rows split by
    content hash (``held_out``)."""
    qa = read_qa_manifest(spec.manifest_dir) if any(s.kind == "qa" for s in spec.sources) else None
    captions = read_caption_manifest(spec.manifest_dir) if any(s.kind == "describe" for s in spec.sources) else None
    out = []
    for s in spec.sources:
        splits = spec.train_splits if role == "train" or s.holdout else spec.val_splits
        if s.kind == "qa":
            rows = qa.select([s.dataset], splits)
        else:
            rows = describe_rows(captions.select([s.dataset], splits), spec.describe_prompt)
        if s.holdout:
            keep = held_out(rows["video_sha256"], s.holdout) == (role == "val")
            if not keep.any():
                raise ValueError(f"source {s.label}: holdout {s.holdout} leaves no {role} videos of "
                                 f"{rows['video_sha256'].nunique()}; raise or lower it")
            rows = rows[keep].reset_index(drop=True)
        out.append(rows)
    return out


def held_out(video_sha256: pd.Series, share: float) -> pd.Series:
    """Whether each video is in the ``share`` held out by content: the first 32 bits of its SHA-256 below
    ``share`` x 2^32 (a video's place never depends on which other videos the set holds)."""
    return video_sha256.str[:8].map(lambda h: int(h, 16)) < share * 2**32


def concat_encoded(parts: list[EncodedSet]) -> tuple[EncodedSet, list[list[int]]]:
    """One set from several, plus each part's sample indices in it."""
    rows = pd.concat([p.rows for p in parts], ignore_index=True)
    samples = ChainedSamples([p.samples for p in parts])  # encodes nothing: lazy parts stay lazy
    rejected = pd.concat([p.rejected for p in parts], ignore_index=True)
    bounds, start = [], 0
    for p in parts:
        bounds.append(list(range(start, start + len(p.samples))))
        start += len(p.samples)
    return EncodedSet(rows, samples, rejected, sum(p.truncated for p in parts)), bounds


# ------------------------------------------------------------------------------------------------ model


def apply_lora(vlm, spec: LoRASpec, seed: int) -> list[str]:
    """Wrap the LLM with peft LoRA; freeze everything else (TokenMining stays trainable when tuned). Returns the
    trainable names and checks them: LoRA matrices and ``lora.modules_to_save`` copies only, plus TokenMining if
    asked."""
    torch.manual_seed(seed)  # LoRA A matrices are randomly initialised
    vlm.requires_grad_(False)
    vlm.llm = get_peft_model(vlm.llm, LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                                                 target_modules=spec.target_modules,
                                                 modules_to_save=spec.modules_to_save or None, bias="none",
                                                 task_type="CAUSAL_LM"))
    if spec.tune_token_mining:
        vlm.token_mining.requires_grad_(True)
    trainable = [n for n, p in vlm.named_parameters() if p.requires_grad]
    wrong = [n for n in trainable if not ("lora_" in n or ".modules_to_save." in n
                                          or (spec.tune_token_mining and n.startswith("token_mining.")))]
    missing = [m for m in spec.modules_to_save if not any(f".{m}.modules_to_save." in n for n in trainable)]
    problem = (f"unexpected {wrong[:5]}" if wrong else f"no module named {missing}" if missing
               else None if any("lora_" in n for n in trainable) else "no LoRA parameter")
    if problem:
        raise RuntimeError(f"stage-2 trainable set is wrong: {problem}; check lora.target_modules "
                           f"({spec.target_modules}) and lora.modules_to_save ({spec.modules_to_save}) against the "
                           "LLM's module names")
    return trainable


def export_stage2(vlm, out_dir: Path, meta: dict) -> Path:
    """``adapter/`` + ``token_mining/`` + ``stage2.json``, atomically."""
    with replace_dir(out_dir) as tmp:
        vlm.llm.save_pretrained(str(tmp / "adapter"))
        save_token_mining(vlm.token_mining, tmp / "token_mining", {"stage2": meta.get("run_key")})
        (tmp / STAGE2_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
    return out_dir


# ------------------------------------------------------------------------------------------------ the job


class LoRARecipe(Recipe):
    """Stage 2 (see the module docstring): LoRA on the LLM, TokenMining loaded from stage 1 and optionally tuned."""

    stage = "lora_finetune"

    def run(self) -> Stage2Result:
        config, spec = self.config, self.config.data
        fingerprint = read_caption_manifest(spec.manifest_dir).fingerprint

        # build: towers, LLM and the stage-1 TokenMining on the device, then LoRA (the trainable set is checked)
        parts = build_vlm_parts(config.vision, config.llm, config.token_mining).to(self.device)
        vlm, tokenizer = parts.vlm, parts.tokenizer
        digests = {**parts.digests, "token_mining_init": module_digest(vlm.token_mining)}
        trainable = apply_lora(vlm, config.lora, config.train.seed)
        vlm.to(self.device)  # the new adapter matrices
        n_params = sum(p.numel() for p in vlm.parameters() if p.requires_grad)
        log.info("stage 2: %d trainable tensors, %d parameters (%s)", len(trainable), n_params, config.lora.describe())
        # sequence mode stages the whole run (MixtureBatchSampler's run_batches): its order depends on the run's
        # length in batches, so a resume with other steps, accumulation or process count starts a new run
        run_batches = config.train.max_steps * config.train.grad_accum * self.accelerator.num_processes
        self.open_run(data=fingerprint, **digests,
                      **({"sequence_batches": str(run_batches)} if config.data.mode == "sequence" else {}))

        # data: QA and "describe" samples of each source, the feature cache filled on the device
        n_tokens = vlm.token_mining.config.num_tokens(parts.num_frames)

        def encode(rows: pd.DataFrame) -> EncodedSet:
            return encode_samples(rows, tokenizer, video_tokens=n_tokens, max_length=spec.max_length)

        memo = self.run_dir / "tokens.sqlite" if spec.memo_tokens else None
        train_parts = [encode_training_set(r, tokenizer, video_tokens=n_tokens, max_length=spec.max_length,
                                           tokenize=spec.tokenize, memo=memo)
                       for r in source_rows(spec, "train")]
        val_parts = []
        for rows in source_rows(spec, "val"):
            if spec.max_val_samples and len(rows) > spec.max_val_samples:
                rows = rows.sample(spec.max_val_samples, random_state=0).reset_index(drop=True)
            val_parts.append(encode(rows))
        for s, enc in zip(spec.sources, train_parts, strict=True):
            if not enc.samples:
                raise ValueError(f"every training sample of source {s.label} was rejected, e.g. "
                                 f"{enc.rejected['reason'].iat[0]!r}; fix the data or raise data.max_length")
        train_enc, train_index = concat_encoded(train_parts)
        val_enc, _ = concat_encoded(val_parts)
        cache = cache_tower_features(config.features, parts, [train_enc, val_enc], self.tracker,
                                     config.train.progress)

        def dataset(encoded: EncodedSet) -> VideoQADataset:
            return VideoQADataset(encoded, pad_token_id=tokenizer.pad_token_id, cache=cache,
                                  num_frames=parts.num_frames, image_size=parts.image_size)

        train_set = dataset(train_enc)
        val_sets = {s.label: dataset(EncodedSet(p.rows, p.samples, p.rejected, p.truncated))
                    for s, p in zip(spec.sources, val_parts, strict=True) if p.samples}
        val_all = dataset(val_enc)
        log.info("stage 2: %d training samples (%s) from %d sources (%s), %d held-out (%d rejected)",
                 len(train_set), spec.tokenize, len(spec.sources), spec.mode, len(val_all), len(val_enc.rejected))

        # baselines: the held-out answer loss before stage 2, over all sources and per source
        bs = config.eval_batch_size

        def evaluate(_vlm) -> dict[str, float]:
            out = {"val/lm_loss": answer_loss(vlm, val_all, bs)}
            for label, ds in val_sets.items():
                out[f"val/lm_loss/{label}"] = loss = answer_loss(vlm, ds, bs)
                # the wrong-video control per source (each sample given another clip's tokens): how much of the
                # source's answers the VLM reads from its own video; near 0, it answers from the text alone
                if ds.rows["video_sha256"].nunique() > 1:
                    out[f"val/video_gain/{label}"] = answer_loss(vlm, ds, bs, shuffle_video=True) - loss
            # where TokenMining looks: on the demo, runs that learnt the colours put 0.58-1.0 of a query token's
            # attention on CLIP-ViP's CLS + proxies, runs left at chance 0.03-0.05 (vlm_parts.attention_summary)
            summary = attention_summary(vlm, val_all, bs, parts.num_proxies)
            out.update({f"val/tm_attention/{k}": v for k, v in summary.items()})
            return out

        initial = evaluate(vlm)
        self.tracker.log_metrics(initial, 0)
        log.info("held-out answer loss before stage 2: %.4f", initial["val/lm_loss"])

        # train the adapters (and TokenMining when tuned); checkpoints hold only those
        settings = config.train
        if settings.gradient_checkpointing:
            vlm.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            settings = settings.model_copy(update={"gradient_checkpointing": False})
        sampler = MixtureBatchSampler(train_index, [s.ratio for s in spec.sources], settings.batch_size,
                                      mode=spec.mode, seed=settings.seed,
                                      run_batches=run_batches,
                                      lengths=train_enc.rows["conversations"].str.len().to_numpy()
                                      if spec.group_by_length else None,
                                      names=[s.label for s in spec.sources])
        resolved = {"lora_finetune": config.model_dump(mode="json"), "data_fingerprint": fingerprint,
                    "run_key": self.key, "digests": digests}
        fit = self.train(vlm, lm_objective, train_set, sampler, resolved=resolved, evaluate=evaluate,
                         state="trainable", settings=settings)

        # export the final and best adapters (+ their TokenMining); report the best
        meta = {"run_key": self.key, "vision": config.vision.model_dump(mode="json"),
                "llm": config.llm.model_dump(mode="json"),
                "token_mining": {**config.token_mining.model_dump(mode="json"), "init": None},
                "lora": config.lora.model_dump(mode="json"), "digests": digests, "data_fingerprint": fingerprint,
                "describe_prompt": spec.describe_prompt, "step": fit.step}
        final_dir = self.export(self.out_dir / "final", lambda d: export_stage2(vlm, d, meta))
        meta["step"] = self.restore_best(vlm, fit, state="trainable")
        best_dir = self.export(self.out_dir / "best", lambda d: export_stage2(vlm, d, meta))
        best = evaluate(vlm)
        rejected = pd.concat([train_enc.rejections(), val_enc.rejected], ignore_index=True)  # lazy: as met
        samples = {"train": len(train_set) - len(train_enc.rejections()), "val": len(val_all),
                   "rejected": len(rejected), "truncated": train_enc.truncated + val_enc.truncated,
                   **{f"train/{s.label}": len(idx) for s, idx in zip(spec.sources, train_index, strict=True)}}
        metrics = {"lm_loss_initial": initial["val/lm_loss"],
                   **{k.removeprefix("val/"): v for k, v in best.items()}}  # lm_loss[/<source>], video_gain/<source>
        return Stage2Result(self.run_dir, best_dir, final_dir, fit, metrics, samples, rejected)


def run_lora_finetune(config: LoRAFinetuneConfig, *, tracker: ResilientTracker | None = None) -> Stage2Result:
    return LoRARecipe(config, tracker=tracker).run()
