"""Demo stand-in for a pretrained Gemma: a tiny Gemma trained as a text language model on the synthetic corpus.

HiLight starts stage 1 from a pretrained, instruction-tuned Gemma-2B: it already speaks the chat template and the
domain's language; only the video is new. Offline and on CPU there is no such model, so the demo builds one:
a Gemma-style tokenizer trained on the corpus (``build_gemma_tokenizer``) and a tiny Gemma trained on the training
split's captions and QA conversations rendered in the chat template. Each conversation appears once without
context and once with all captions of its clip where the ``<video>`` marker stood: the model learns
the answer formats, the text-only priors ("Two shapes are moving." is common) and to read facts from a
description in its context, as an instruction-tuned LLM can. It never sees a video: stage 1 must turn the clip
into tokens that play the description's part.

The export ``<output_dir>/model`` is a standard transformers directory (``config.json``, ``model.safetensors``,
tokenizer files), exactly what real runs point ``llm.dir`` at for Gemma-2B.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.nn.utils.rnn import pad_sequence

from hilight.data.captions import read_caption_manifest
from hilight.data.conversations import (IGNORE_INDEX, VIDEO_TOKEN, Turn, encode, parse_conversation, render,
                                        strip_video)
from hilight.data.qa import read_qa_manifest
from hilight.data.synth import general
from hilight.data.samplers import CaptionBatchSampler
from hilight.models.checkpoints import replace_dir
from hilight.models.tokenizers import build_gemma_tokenizer, load_llm_tokenizer
from hilight.models.vlm import build_llm, gemma_config, token_loss
from hilight.tracking import ResilientTracker
from hilight.train.loop import FitResult, TrackingSpec, TrainSettings
from hilight.train.recipe import Recipe, lm_objective

log = logging.getLogger(__name__)


class TextCorpusSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    manifest_dir: str = "outputs/data_validation"
    datasets: list[str] | None = None  # None = every dataset in the manifest
    train_splits: list[str] = ["train"]
    val_splits: list[str] = ["val", "test"]
    captions: bool = True
    qa: bool = True
    qa_context: bool = True  # also each QA conversation with its clip's captions in place of the video
    # extra text-only scenes of the general generator (captions as context + their QA), never rendered: enough
    # reading practice for a tiny LM to learn to take facts from its context; 0 disables
    reading_scenes: int = Field(0, ge=0)
    reading_seed: int = 12345


class LLMPretrainConfig(BaseModel):
    """Config of the ``llm_pretrain`` pipeline (``configs/llm_pretrain_demo.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    pipeline: Literal["llm_pretrain"] = "llm_pretrain"
    experiment_name: str = "llm_pretrain"
    name: str = Field("llm", pattern=r"^[A-Za-z0-9_.-]+$")
    output_dir: str = "outputs/llm_pretrain"
    data: TextCorpusSpec = Field(default_factory=TextCorpusSpec)
    vocab_size: int = Field(512, ge=300)  # the tokenizer trained on the corpus
    preset: str = "tiny"  # hilight/models/presets/gemma/<preset>.json
    hidden_act: str = "gelu"  # pinned (Gemma-2B's config says exact GELU)
    init_seed: int = 0
    max_length: int = Field(96, ge=8)
    eval_batch_size: int = Field(32, ge=1)
    train: TrainSettings
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    enable_cache: bool = True


@dataclass
class LLMPretrainResult:
    run_dir: Path
    model_dir: Path
    fit: FitResult
    val_loss: float  # held-out per-token loss of the exported model
    val_loss_init: float  # the same for the untrained model


class TextDataset(torch.utils.data.Dataset):
    def __init__(self, sequences: list[list[int]], pad_token_id: int):
        self.sequences, self.pad_token_id, self.epoch = sequences, pad_token_id, 0

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, items: list[int]) -> dict[str, torch.Tensor]:
        ids = [torch.tensor(self.sequences[i]) for i in items]
        labels = [x.clone() for x in ids]
        for x in labels:
            x[0] = IGNORE_INDEX  # nothing predicts <bos>
        return {"input_ids": pad_sequence(ids, batch_first=True, padding_value=self.pad_token_id),
                "attention_mask": pad_sequence([torch.ones_like(x) for x in ids], batch_first=True, padding_value=0),
                "labels": pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX)}


def corpus_texts(config: LLMPretrainConfig, splits: list[str]) -> tuple[list[str], list[list[Turn]]]:
    """(captions, QA conversations as turns) of the selected datasets and splits: each conversation without its
    video, plus (``qa_context``) once per caption of its clip with the caption in the video's place."""
    caption_rows = read_caption_manifest(config.data.manifest_dir).select(config.data.datasets, splits)
    captions = caption_rows["caption"].tolist() if config.data.captions else []
    conversations = []
    if config.data.qa:
        by_video = caption_rows.groupby("video_file")["caption"].apply(list).to_dict()
        rows = read_qa_manifest(config.data.manifest_dir).select(config.data.datasets, splits)
        for video_file, conv in zip(rows["video_file"], rows["conversations"], strict=True):
            turns = parse_conversation(conv, add_video=True)
            conversations.append(strip_video(turns))
            if config.data.qa_context and video_file in by_video:
                conversations.append(with_context(turns, " ".join(c.rstrip(".") + "." for c in by_video[video_file])))
    return captions, conversations


def reading_corpus(n: int, seed: int) -> list[list[Turn]]:
    """``n`` text-only scenes: every caption of the scene as context, then its questions (a fresh generator stream,
    so no rendered clip's text is reproduced on purpose)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        captions, qa = general.text_scene(rng)
        context = " ".join(c.text.rstrip(".") + "." for c in captions)
        turns = [Turn(q.question, q.answer) for q in qa]
        out.append([Turn(f"{context}\n{turns[0].question}", turns[0].answer), *turns[1:]])
    return out


def with_context(turns: list[Turn], context: str) -> list[Turn]:
    """The conversation with ``context`` text where its ``<video>`` marker stands."""
    return [Turn(t.question.replace(VIDEO_TOKEN, context), t.answer) for t in turns]


def encode_corpus(tokenizer, captions: list[str], conversations: list[list], max_length: int) -> list[list[int]]:
    seqs = [tokenizer(c, truncation=True, max_length=max_length - 1)["input_ids"] + [tokenizer.eos_token_id]
            for c in captions]
    # plain LM pretraining: a long sequence is simply cut (no answer to protect, unlike the QA stages)
    seqs += [encode(turns, tokenizer, video_tokens=1).input_ids[:max_length] for turns in conversations]
    return seqs


@torch.no_grad()
def corpus_loss(model, dataset: TextDataset, batch_size: int) -> float:
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        b = {k: v.to(device) for k, v in dataset.collate(list(range(start, min(start + batch_size, len(dataset))))).items()}
        s, n = token_loss(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
        total, count = total + s, count + n
    return total / max(count, 1)


class LLMPretrainRecipe(Recipe):
    """The demo's stand-in for Gemma-2B: a tokenizer and a tiny Gemma trained as a text LM, exported as a
    transformers directory."""

    stage = "llm_pretrain"

    def run(self) -> LLMPretrainResult:
        config = self.config
        manifest = read_caption_manifest(config.data.manifest_dir)
        self.open_run(data=manifest.fingerprint)

        # data and tokenizer
        train_caps, train_convs = corpus_texts(config, config.data.train_splits)
        train_convs += reading_corpus(config.data.reading_scenes, config.data.reading_seed)
        val_caps, val_convs = corpus_texts(config, config.data.val_splits)
        with self.accelerator.main_process_first():  # one process trains the tokenizer, the others read it
            tok_dir = self.run_dir / "tokenizer"
            tokenizer = (build_gemma_tokenizer(train_caps + [render(t) for t in train_convs], tok_dir,
                                               vocab_size=config.vocab_size)
                         if self.accelerator.is_main_process else load_llm_tokenizer(tok_dir))
        train_set = TextDataset(encode_corpus(tokenizer, train_caps, train_convs, config.max_length),
                                tokenizer.pad_token_id)
        val_set = TextDataset(encode_corpus(tokenizer, val_caps, val_convs, config.max_length), tokenizer.pad_token_id)
        log.info("text LM: %d training sequences, %d held out, vocab %d", len(train_set), len(val_set), len(tokenizer))

        # build
        llm_config = gemma_config(config.preset, vocab_size=len(tokenizer), hidden_act=config.hidden_act,
                                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id)
        model = build_llm(llm_config, seed=config.init_seed).to(self.device)

        # baseline, train, restore the best, export, evaluate
        val_loss_init = corpus_loss(model, val_set, config.eval_batch_size)
        self.tracker.log_metrics({"val/lm_loss": val_loss_init}, 0)
        sampler = CaptionBatchSampler(range(len(train_set)), config.train.batch_size, mode="random",
                                      seed=config.train.seed)
        resolved = {"llm_pretrain": config.model_dump(mode="json"), "data_fingerprint": manifest.fingerprint,
                    "run_key": self.key}
        fit = self.train(model, lm_objective, train_set, sampler, resolved=resolved,
                         evaluate=lambda m: {"val/lm_loss": corpus_loss(m, val_set, config.eval_batch_size)})
        self.restore_best(model, fit)
        model_dir = self.export(self.out_dir / "model", lambda d: export_hf(model, tokenizer, d))
        val_loss = corpus_loss(model, val_set, config.eval_batch_size)
        return LLMPretrainResult(self.run_dir, model_dir, fit, val_loss, val_loss_init)


def run_llm_pretrain(config: LLMPretrainConfig, *, tracker: ResilientTracker | None = None) -> LLMPretrainResult:
    return LLMPretrainRecipe(config, tracker=tracker).run()


def export_hf(model, tokenizer, out_dir: Path) -> Path:
    """``save_pretrained`` of model and tokenizer, swapped into place in one rename."""
    with replace_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return out_dir

