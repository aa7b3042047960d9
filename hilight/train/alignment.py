"""Stage 0: CLIP-ViP alignment on caption tables with the CLIP global loss + the SPARC local loss.

``AlignmentRecipe(config).run()`` (or ``run_alignment(config)``) reads top to bottom: data → tokenizer → model
(+ initial weights) on the accelerator's device → objective → ``Trainer`` → export the final and best models →
held-out retrieval of the trained model next to a random-init model (the proof that it learned). The research notes' final recipe (§3) is ``configs/alignment_clipvip_b16.yaml``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from hilight.data.captions import CaptionManifest, CaptionVideoDataset, attach_hard_negatives, read_caption_manifest
from hilight.data.samplers import CaptionBatchSampler
from hilight.env import resolve_path
from hilight.eval.retrieval import retrieval_metrics
from hilight.losses import ClipGlobalLoss, SimilarityPenalty, SparcLocalLoss
from hilight.losses.sparc_local import Placement, language_mask, parse_keep, placement_depths
from hilight.data.hashcache import sha256_file
from hilight.models.checkpoints import load_clipvip_weights, replace_dir, save_model, weights_digest
from hilight.models.clipvip import AlignmentOutput, CLIPViPConfig, CLIPViPModel, build_clipvip, load_preset
from hilight.models.tokenizers import build_clip_tokenizer, load_clip_tokenizer
from hilight.tracking import ResilientTracker
from hilight.train.loop import FitResult, TrackingSpec, TrainSettings
from hilight.train.recipe import Recipe

log = logging.getLogger(__name__)


class AlignmentData(BaseModel):
    model_config = ConfigDict(extra="forbid")

    manifest_dir: str = "outputs/data_validation"  # output of the data_validation pipeline
    train_datasets: list[str] | None = None  # None = every dataset in the manifest
    train_splits: list[str] = ["train"]
    val_datasets: list[str] | None = None  # held-out set for validation and the final retrieval report
    val_splits: list[str] = ["val", "test"]
    jitter: bool = False  # CLIP-ViP's random frame offsets within each segment (seeded, resumable)
    # dataset -> hard-negatives file (records video_id, caption, negative, changed; the `hard_negatives` contract):
    # each training caption's negatives become extra wrong captions for its video (NegCLIP). Empty: none.
    hard_negatives: dict[str, str] = Field(default_factory=dict)
    # how many of a caption's negatives each step shows (the next ones in turn, every epoch; all when it has fewer):
    # 1 is NegCLIP's one per caption; more puts every changed fact (colour, action, place) against its caption at
    # once, for a few more text rows per step
    negatives_per_caption: int = Field(1, ge=1)
    contracts_dir: str = "data_contracts"
    cache_frames: bool = False  # keep decoded clips in memory (small datasets, no jitter)


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    preset: str = "tiny"  # hilight/models/presets/clipvip/<preset>.json
    overrides: dict = Field(default_factory=dict)  # nested overrides of the preset
    init: str | None = None  # None = random init; else a .pt (original / HiLight layout) or a saved model dir
    init_seed: int = 0


class TokenizerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dir: str | None = None  # a local CLIP tokenizer; None = train one on the training-split captions (demo)
    vocab_size: int = 1024  # only when training one
    max_length: int = Field(32, ge=4)  # CLIP-ViP: 50 (MSR-VTT) or 70 (pretraining)


class LocalLossSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weight: float = Field(1.0, ge=0)  # 0 disables the local loss
    placement: Placement = "before_projector"
    keep: int | str = "2320/2356"  # top-k patches per token, or the notes' threshold "N/P"
    language_mask: bool = True
    exclude_special: bool = True  # with the mask: also drop the start token and EOS
    include_proxies: bool = True  # P counts the CLS + proxy tokens (the notes' 2356)
    temperature: Literal["shared"] | float = "shared"  # "shared" = exp(logit_scale); a number = fixed 1/τ
    checkpoint_depths: bool = True  # recompute each depth in backward (all_hidden_states memory)


class LossSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    global_weight: float = Field(1.0, ge=0)
    group_aware: bool = False
    reduction: Literal["sum", "mean"] = "sum"  # CLIP-ViP's NCELearnableTempLoss sums both directions
    # pairwise term of each hard negative against its caption (ClipGlobalLoss); needs data.hard_negatives
    hard_negative_weight: float = Field(0.0, ge=0)
    local: LocalLossSpec = Field(default_factory=LocalLossSpec)
    token_similarity_weight: float = Field(0.0, ge=0)  # anti-collapse penalties (notes §1.3)
    patch_similarity_weight: float = Field(0.0, ge=0)


class AlignmentConfig(BaseModel):
    """Config of the ``clipvip_alignment`` pipeline (``configs/alignment_*.yaml``, ``pretrain_general_demo.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    pipeline: Literal["clipvip_alignment"] = "clipvip_alignment"
    experiment_name: str = "clipvip_alignment"
    name: str = Field("alignment", pattern=r"^[A-Za-z0-9_.-]+$")  # names the run directory and the MLflow run
    output_dir: str = "outputs/alignment"
    data: AlignmentData = Field(default_factory=AlignmentData)
    model: ModelSpec = Field(default_factory=ModelSpec)
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec)
    loss: LossSpec = Field(default_factory=LossSpec)
    sampler: Literal["random", "grouped"] = "grouped"
    eval_batch_size: int = Field(32, ge=1)
    train: TrainSettings
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    enable_cache: bool = True

    @model_validator(mode="after")
    def _negatives_for_their_loss(self) -> AlignmentConfig:
        if self.loss.hard_negative_weight > 0 and not self.data.hard_negatives:
            raise ValueError(f"loss.hard_negative_weight is {self.loss.hard_negative_weight} but data.hard_negatives "
                             "is empty: name a hard-negatives file per dataset, or set the weight to 0")
        return self


@dataclass
class AlignmentResult:
    run_dir: Path
    final_model: Path
    best_model: Path
    tokenizer_dir: Path
    fit: FitResult
    retrieval: dict[str, float]  # held-out metrics of the best model
    baseline: dict[str, float]  # the same for the random-init model


# ------------------------------------------------------------------------------------------------ objective


class AlignmentObjective:
    """Global CLIP loss on pooled embeddings + SPARC local loss at the configured depths + penalties.

    Called with the model as training sees it (DDP-wrapped on several processes): one ``model(...)`` forward
    returns everything the losses need, and the losses hold no parameters. The global loss gathers embeddings
    across ranks; the local loss and the penalties are per sample (see their modules)."""

    def __init__(self, spec: LossSpec, config: CLIPViPConfig):
        self.spec = spec
        num_patches = config.seq_len if spec.local.include_proxies else config.seq_len - config.vision.num_proxies
        self.depths = placement_depths(spec.local.placement, config.vision.num_hidden_layers,
                                       config.text.num_hidden_layers)
        self.global_loss = ClipGlobalLoss(group_aware=spec.group_aware, reduction=spec.reduction,
                                          hard_negative_pairs=spec.hard_negative_weight > 0)
        self.local_loss = SparcLocalLoss(parse_keep(spec.local.keep, num_patches) if self.uses_local else num_patches)
        self.penalty = SimilarityPenalty()
        self.eos = config.text.eos_token_id
        self.skip_proxies = 0 if spec.local.include_proxies else config.vision.num_proxies

    @property
    def uses_local(self) -> bool:
        return self.spec.local.weight > 0 or self.spec.token_similarity_weight > 0 or self.spec.patch_similarity_weight > 0

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: AlignmentOutput = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                                     video_index=batch["video_index"],
                                     token_layers=[(v, t) for v, t, _ in self.depths] if self.uses_local else None,
                                     skip_video_tokens=self.skip_proxies)
        b = len(batch["groups"])  # the captions; text rows after them are hard negatives (AlignmentData.hard_negatives)
        negative_of = batch.get("negative_of")
        terms = self.global_loss(out.video_embeds[:b], out.text_embeds[:b], out.scale, batch["groups"],
                                 negative_embeds=out.text_embeds[b:], negative_of=negative_of)
        loss = self.spec.global_weight * terms["global_loss"]
        if "hard_negative_loss" in terms:
            loss = loss + self.spec.hard_negative_weight * terms["hard_negative_loss"]
        if self.uses_local:
            mask = language_mask(batch["input_ids"][:b], batch["attention_mask"][:b], self.eos,
                                 enabled=self.spec.local.language_mask, exclude_special=self.spec.local.exclude_special)
            scale = out.scale if self.spec.local.temperature == "shared" else torch.tensor(float(self.spec.local.temperature))
            local = {"local_loss": 0.0, "token_similarity_loss": 0.0, "patch_similarity_loss": 0.0}
            for (_, _, w), patches, tokens in zip(self.depths, out.video_tokens, out.text_tokens, strict=True):
                patches, tokens = patches[:b], tokens[:b]  # the local loss pairs true captions only
                fn = lambda v, t: self._local_terms(v, t, mask, scale)  # noqa: E731
                if self.spec.local.checkpoint_depths and torch.is_grad_enabled() and len(self.depths) > 1:
                    # recompute each depth's [B, L, P] similarities in backward instead of keeping 13 of them
                    terms_d = torch.utils.checkpoint.checkpoint(fn, patches, tokens, use_reentrant=False)
                else:
                    terms_d = fn(patches, tokens)
                for k, v in zip(local, terms_d, strict=True):
                    local[k] = local[k] + w * v
            terms.update(local)
            loss = (loss + self.spec.local.weight * local["local_loss"]
                    + self.spec.token_similarity_weight * local["token_similarity_loss"]
                    + self.spec.patch_similarity_weight * local["patch_similarity_loss"])
        terms["loss"] = loss
        terms["logit_scale"] = out.scale.detach().log()
        return terms

    def _local_terms(self, patches, tokens, mask, scale):
        """One depth's local loss and penalties from projected tokens ``patches`` [B, P, D], ``tokens`` [B, L, D]."""
        pen = self.penalty(patches, tokens, mask)
        return (self.local_loss(patches, tokens, mask, scale)["local_loss"], pen["token_similarity_loss"],
                pen["patch_similarity_loss"])


# ------------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def embed_split(model: CLIPViPModel, dataset: CaptionVideoDataset, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit video embeddings [Nv, P] (one per distinct video) and caption embeddings [Nt, P]."""
    model.eval()
    device = next(model.parameters()).device
    videos = []
    for start in range(0, len(dataset.video_files), batch_size):
        pix = torch.stack([dataset.frames(v) for v in range(start, min(start + batch_size, len(dataset.video_files)))])
        videos.append(model.video_embeds(model.encode_video(pix.to(device))))
    texts = []
    for start in range(0, len(dataset), batch_size):
        enc = dataset.tokenizer(dataset.captions[start:start + batch_size], padding="max_length", truncation=True,
                                max_length=dataset.max_length, return_tensors="pt").to(device)
        texts.append(model.text_embeds(model.encode_text(enc["input_ids"], enc["attention_mask"])))
    return torch.cat(videos).float().cpu(), torch.cat(texts).float().cpu()


def retrieval_eval(model: CLIPViPModel, dataset: CaptionVideoDataset, batch_size: int) -> dict[str, float]:
    v, t = embed_split(model, dataset, batch_size)
    return retrieval_metrics(t @ v.T, torch.from_numpy(dataset.groups).long(), ks=(1, 5, 10))


# ------------------------------------------------------------------------------------------------ the job


def init_digest(spec: ModelSpec) -> str:
    if spec.init is None:
        return f"random:{spec.init_seed}"
    return weights_digest(resolve_path(spec.init))


def build_model(spec: ModelSpec, tokenizer) -> CLIPViPModel:
    config = load_preset(spec.preset, spec.overrides)
    if len(tokenizer) > config.text.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but preset {spec.preset!r} has vocab_size "
                         f"{config.text.vocab_size}; raise model.overrides.text.vocab_size")
    if tokenizer.eos_token_id != config.text.eos_token_id:
        raise ValueError(f"the tokenizer's EOS id is {tokenizer.eos_token_id} but preset {spec.preset!r} pools at "
                         f"eos_token_id {config.text.eos_token_id}; set model.overrides.text.eos_token_id")
    model = build_clipvip(config, seed=spec.init_seed)
    if spec.init is not None:
        load_clipvip_weights(model, resolve_path(spec.init))
    return model


def prepare_tokenizer(config: AlignmentConfig, manifest: CaptionManifest, out_dir: Path, *, train: bool = True):
    """The configured tokenizer, the initial model's, or one trained on the training-split captions into
    ``out_dir/tokenizer`` (``train=False``: read the one another process trained there)."""
    if config.tokenizer.dir:
        return load_clip_tokenizer(resolve_path(config.tokenizer.dir), config.tokenizer.max_length), resolve_path(config.tokenizer.dir)
    if config.model.init is not None:
        # a model initialised from weights must keep the tokenizer it was trained with
        saved = resolve_path(config.model.init)
        if (saved / "tokenizer").is_dir():
            return load_clip_tokenizer(saved / "tokenizer", config.tokenizer.max_length), saved / "tokenizer"
    # the training splits of every dataset, not only train_datasets: a later stage initialised from this model reuses
    # this tokenizer on its own datasets (billiards alignment after general pretraining). Never val/test/eval captions:
    # their words would shape the vocabulary, and so every model, before they are scored.
    texts = manifest.select(None, config.data.train_splits)["caption"].tolist()
    tok_dir = out_dir / "tokenizer"
    if not train:
        return load_clip_tokenizer(tok_dir, config.tokenizer.max_length), tok_dir
    return build_clip_tokenizer(texts, tok_dir, vocab_size=config.tokenizer.vocab_size,
                                max_length=config.tokenizer.max_length), tok_dir


class AlignmentRecipe(Recipe):
    """Stage 0: data → tokenizer → model (+ initial weights) on the device → ``Trainer`` → exports of the final and
    best models → held-out retrieval of the best model next to a random-init one (the proof that it learned)."""

    stage = "alignment"

    def run(self) -> AlignmentResult:
        config = self.config
        manifest = read_caption_manifest(config.data.manifest_dir)
        self.open_run(data=manifest.fingerprint, init=init_digest(config.model),
                      **{f"negatives:{d}": sha256_file(resolve_path(p)) for d, p in config.data.hard_negatives.items()})

        # build
        with self.accelerator.main_process_first():  # one process trains the tokenizer, the others read it
            tokenizer, tok_dir = prepare_tokenizer(config, manifest, self.run_dir,
                                                   train=self.accelerator.is_main_process)
        model = build_model(config.model, tokenizer).to(self.device)
        mcfg = model.config

        # data
        make = lambda rows, jitter: CaptionVideoDataset(  # noqa: E731
            rows, tokenizer, num_frames=mcfg.num_frames, image_size=mcfg.vision.image_size,
            max_length=config.tokenizer.max_length, jitter_seed=config.train.seed if jitter else None,
            cache_frames=config.data.cache_frames, negatives_per_caption=config.data.negatives_per_caption)
        train_rows = manifest.select(config.data.train_datasets, config.data.train_splits)
        if config.data.hard_negatives:
            train_rows = attach_hard_negatives(train_rows, self.read_hard_negatives(train_rows))
        train_set = make(train_rows, config.data.jitter)
        val_set = make(manifest.select(config.data.val_datasets, config.data.val_splits), False)
        sampler = CaptionBatchSampler(train_set.groups, config.train.batch_size, mode=config.sampler,
                                      seed=config.train.seed)
        log.info("training on %d captions of %d videos; validating on %d captions of %d videos",
                 len(train_set), len(train_set.video_files), len(val_set), len(val_set.video_files))

        # train
        resolved = {"alignment": config.model_dump(mode="json"), "model": mcfg.model_dump(mode="json"),
                    "data_fingerprint": manifest.fingerprint, "run_key": self.key}
        fit = self.train(model, AlignmentObjective(config.loss, mcfg), train_set, sampler, resolved=resolved,
                         evaluate=lambda m: {f"val/{k}": v for k, v in
                                             retrieval_eval(m, val_set, config.eval_batch_size).items()},
                         after_step=CLIPViPModel.clamp_logit_scale)

        # export: the final weights and the best checkpoint's, each a standalone model directory with its tokenizer
        # (stable paths under output_dir, so a later stage's config can point at `<output_dir>/best`)
        final_dir = self.export(self.out_dir / "final", lambda d: _export(model, d, resolved, tok_dir))
        self.restore_best(model, fit)
        best_dir = self.export(self.out_dir / "best", lambda d: _export(model, d, resolved, tok_dir))

        # evaluate: the best model next to the random-init one
        retrieval = retrieval_eval(model, val_set, config.eval_batch_size)
        random_init = build_clipvip(mcfg, seed=config.model.init_seed).to(self.device)
        baseline = retrieval_eval(random_init, val_set, config.eval_batch_size)
        return AlignmentResult(self.run_dir, final_dir, best_dir, tok_dir, fit, retrieval, baseline)


    def read_hard_negatives(self, rows) -> pd.DataFrame:
        """The configured hard-negatives files through their data contract (rejects quarantined under the run
        directory), as one table with a ``dataset`` column."""
        from hilight.data.contracts import load_contracts
        from hilight.data.eval_files import contract_for, validate_eval_file

        hn = self.config.data.hard_negatives
        unknown = sorted(set(hn) - set(rows["dataset"]))
        if unknown:
            raise ValueError(f"data.hard_negatives names datasets {unknown} that have no training captions (training "
                             f"datasets: {sorted(set(rows['dataset']))}); list negatives of training datasets only")
        contract = contract_for("negatives", load_contracts(resolve_path(self.config.data.contracts_dir)))
        tables = []
        for dataset, path in hn.items():
            out = self.run_dir / "hard_negatives" / f"rank{self.accelerator.process_index}"
            result = validate_eval_file("negatives", dataset, resolve_path(path), contract, out)
            records = pd.read_json(result.accepted, orient="records", dtype=False)
            tables.append(records[["video_id", "caption", "negative"]].astype(str).assign(dataset=dataset))
        table = pd.concat(tables, ignore_index=True)
        found = attach_hard_negatives(rows, table)["negatives"].map(len)
        log.info("hard negatives: %d of %d training captions have some (%.1f on average)", int((found > 0).sum()),
                 len(rows), float(found[found > 0].mean()) if (found > 0).any() else 0.0)
        return table


def run_alignment(config: AlignmentConfig, *, tracker: ResilientTracker | None = None) -> AlignmentResult:
    return AlignmentRecipe(config, tracker=tracker).run()


def _export(model: CLIPViPModel, out_dir: Path, resolved: dict, tok_dir: Path) -> Path:
    """A standalone model directory (weights, config, tokenizer), swapped into place in one rename."""
    with replace_dir(out_dir) as tmp:
        save_model(model, tmp, {"family": "clipvip", **resolved})
        load_clip_tokenizer(tok_dir).save_pretrained(str(tmp / "tokenizer"))
    return out_dir
