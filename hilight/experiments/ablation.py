"""Ablation of alignment variants: train each variant (the stage-0 job), evaluate its checkpoints on one held-out
set, compare, and pick the best by a rule declared in the config (research notes §2–§3 did this by hand).

``AblationConfig`` expands into one ``AlignmentConfig`` per variant (a base alignment YAML + per-variant overrides).
``evaluate_models`` scores saved models (checkpoints or exports) on an ``EvalSuite``: caption-score matrix,
"say more, wrong more" probe, text↔video retrieval, and attention maps of a few videos. ``select_variant`` applies
the selection rule to the comparison table and returns its evidence.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from hilight.config import deep_merge, read_yaml_mapping
from hilight.data.captions import read_caption_manifest
from hilight.data.contracts import load_contracts
from hilight.data.eval_files import contract_for, validate_eval_file
from hilight.data.probe import sha256_file
from hilight.env import resolve_path
from hilight.eval.attention import frame_attention
from hilight.eval.caption_scores import (
    EvalSuite,
    build_suite,
    caption_metrics,
    hard_negative_pairs,
    per_video,
    probe_metrics,
)
from hilight.eval.retrieval import retrieval_metrics
from hilight.experiments.bootstrap import Interval, ratio_interval
from hilight.models.checkpoints import CheckpointError, load_clipvip_weights, load_saved_clipvip, weights_digest
from hilight.models.clipvip import CLIPViPModel, build_clipvip, load_preset
from hilight.models.export import default_device
from hilight.models.tokenizers import load_clip_tokenizer
from hilight.train.alignment import AlignmentConfig
from hilight.train.checkpoint import STATE_FILE, list_checkpoints
from hilight.tracking import flatten
from hilight.train.loop import NON_SEMANTIC_KEYS, NON_SEMANTIC_TRAIN_KEYS

log = logging.getLogger(__name__)

NAME = r"^[A-Za-z0-9_.-]+$"
# the notes' out-of-domain captions (§3.1.2: "People are smoking.", "Cat on the table.") and two more
UNRELATED = ["People are smoking.", "Cat on the table.", "A chef is chopping onions in a kitchen.",
             "A dog runs across a snowy field."]


class Variant(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME)  # e.g. BP_WithMask (the notes' names)
    overrides: dict = Field(default_factory=dict)  # nested overrides of the base alignment config
    # or: this variant IS that alignment config's training run, taken verbatim (no base, base_overrides or
    # overrides; it writes where that config writes). Its training step then has the same parameters as the
    # clipvip_alignment pipeline's, so ZenML's cache returns that finished run instead of training it again
    # (the demo's BP_WithMask is the promoted table1k run). With `seeds`, each seed trains anew under <output_dir>.
    config: str | None = None
    description: str = ""

    @model_validator(mode="after")
    def _one_source(self) -> Variant:
        if self.config is not None and self.overrides:
            raise ValueError(f"variant {self.name!r}: give either config (an alignment config taken verbatim) or "
                             "overrides (of the base config), not both")
        return self


# settings a `config:` variant may set differently from the base: where it writes and is tracked, how often it
# validates and saves, which checkpoint it calls best, evaluation batch size, frame caching, where the contracts
# are. None changes the weights a step trains to.
BOOKKEEPING = frozenset({"name", "output_dir", "eval_batch_size", "data.cache_frames", "data.contracts_dir",
                         *NON_SEMANTIC_KEYS}
                        | {f"train.{k}" for k in (*NON_SEMANTIC_TRAIN_KEYS, "val_every", "ckpt_every", "keep_last",
                                                   "select_metric", "select_mode")})


def _same_setting(a, b) -> bool:
    """Equal values, or two strings that name the same path under the config path rule (``./outputs/x``,
    ``outputs/x`` and its absolute form): a path spelled another way is not another setting."""
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str) and a and b:
        return os.path.normpath(resolve_path(a)) == os.path.normpath(resolve_path(b))
    return False


def _related(path: str, axis: str) -> bool:
    """One path lies on or under the other (overriding `loss.local` varies `loss.local.weight`, and vice versa)."""
    return path == axis or path.startswith(f"{axis}.") or axis.startswith(f"{path}.")


class Reference(BaseModel):
    """Weights shown next to the variants but never selected, e.g. the "original" weights every variant starts from."""

    model_config = ConfigDict(extra="forbid")

    path: str  # a saved model dir (config.json + model.safetensors + tokenizer/) or an original-layout .pt
    preset: str | None = None  # for a .pt: the architecture
    overrides: dict = Field(default_factory=dict)
    tokenizer: str | None = None  # for a .pt (or a dir without tokenizer/): a local CLIP tokenizer dir


class AttentionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    videos: int = Field(2, ge=0)  # the first N held-out videos get GIFs and grids (0 = none)
    layer: int = -1  # encoder layer (the notes used the 12th, i.e. the last)
    queries: Literal["all", "cls"] = "all"  # CLS + proxies, or CLS alone
    alpha: float = Field(0.5, gt=0, lt=1)
    fps: float = Field(4.0, gt=0)


class EvalSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    datasets: list[str] | None = None  # None = the base config's val_datasets
    splits: list[str] = ["val", "test"]
    negatives: dict[str, str] = Field(default_factory=dict)  # dataset -> hard negatives file
    probes: dict[str, str] = Field(default_factory=dict)  # dataset -> probe pairs file (else derived from negatives)
    unrelated: list[str] = Field(default_factory=lambda: list(UNRELATED))
    other_videos: int = Field(3, ge=0)  # captions of other held-out videos per candidate set
    max_videos: int | None = Field(None, ge=1)
    checkpoints: Literal["all"] | list[int] = "all"  # training steps to evaluate ("all" = every kept checkpoint)
    references: dict[str, Reference] = Field(default_factory=dict)
    batch_size: int = Field(32, ge=1)
    cache_frames: bool = True  # decode each held-out clip once for all models (memory: N x T x 3 x S x S floats)
    attention: AttentionSpec = Field(default_factory=AttentionSpec)
    heatmap_videos: int = Field(4, ge=0)  # per-video score heatmaps for the first N videos
    seed: int = 0


class MetricOrder(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metric: str
    mode: Literal["max", "min"] = "max"


class SelectionRule(MetricOrder):
    """Each variant is represented by its best evaluated checkpoint (``checkpoint: best``), by the checkpoint its
    training run chose on its own validation set (``validation``: the clips reported on played no part in choosing
    it, so its value is not the maximum of several noisy ones), or by its last one (``final``); variants are ranked
    by ``metric``, then each tie-breaker; references are never selected. With
    several training seeds, a variant's value is its mean over seeds. Each variant's ``metric`` gets a bootstrap
    interval over held-out clips; when the top two overlap the selection is "inconclusive", and
    ``require_significance`` then refuses to select."""

    metric: str = "caption/top1_accuracy"
    checkpoint: Literal["best", "validation", "final"] = "best"
    tie_breakers: list[MetricOrder] = Field(default_factory=lambda: [MetricOrder(metric="caption/margin")])
    confidence: float = Field(0.95, gt=0, lt=1)
    bootstrap_samples: int = Field(2000, ge=100)
    require_significance: bool = False


class SelectionInconclusive(ValueError):
    """``require_significance`` is set and the top two variants' intervals overlap."""


class AblationConfig(BaseModel):
    """Config of the ``alignment_ablation`` pipeline (``configs/ablation_*.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    pipeline: Literal["alignment_ablation"] = "alignment_ablation"
    experiment_name: str = "alignment_ablation"
    name: str = Field("ablation", pattern=NAME)
    base: str  # a clipvip_alignment YAML every variant starts from
    base_overrides: dict = Field(default_factory=dict)  # applied to every variant before its own overrides
    output_dir: str = "outputs/ablation"  # variant V trains under <output_dir>/<V> (a config: variant where its file says)
    variants: list[Variant] = Field(min_length=1)
    seeds: list[int] | None = Field(None, min_length=1)  # train every variant once per seed (train.seed)
    contracts_dir: str = "data_contracts"  # eval.negatives / eval.probes files are validated by its contracts
    eval: EvalSpec = Field(default_factory=EvalSpec)
    selection: SelectionRule = Field(default_factory=SelectionRule)
    enable_cache: bool = True

    @model_validator(mode="after")
    def _check(self) -> AblationConfig:
        names = [v.name for v in self.variants]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"variant names must be unique; repeated: {dupes}")
        if self.seeds is not None and len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds {self.seeds} repeat a value; list each seed once")
        clash = sorted(set(names) & set(self.eval.references))
        if clash:
            raise ValueError(f"{clash} name both a variant and a reference; rename one")
        self.variant_configs()  # every variant must be a valid alignment config; fail now, naming it
        return self

    def variant_configs(self, seed: int | None = None) -> dict[str, AlignmentConfig]:
        """One alignment config per variant; with ``seed``, trained with ``train.seed: seed`` under
        ``<output_dir>/<variant>/seed<seed>``."""
        path = resolve_path(self.base)
        if not path.is_file():
            raise ValueError(f"base alignment config {path} does not exist")
        base = yaml.safe_load(path.read_text(encoding="utf-8"))
        base = deep_merge(base, self.base_overrides)
        out = {}
        for v in self.variants:
            suffix = "" if seed is None else f"/seed{seed}"
            if v.config is not None:
                raw = read_yaml_mapping(resolve_path(v.config))
                if seed is None:  # verbatim: the same step parameters as that config's own pipeline run
                    try:
                        out[v.name] = AlignmentConfig.model_validate(raw)
                    except ValueError as exc:
                        raise ValueError(f"variant {v.name!r}: {v.config} is not a valid alignment config: {exc}") from exc
                    self._check_comparable(v, out[v.name], base)
                    continue
            else:
                raw = deep_merge(base, v.overrides)
            if seed is not None:
                raw = deep_merge(raw, {"train": {"seed": seed}})
            raw.update(name=f"{self.name}-{v.name}{suffix.replace('/', '-')}", output_dir=f"{self.output_dir}/{v.name}{suffix}",
                       experiment_name=self.experiment_name, enable_cache=self.enable_cache)
            try:
                out[v.name] = AlignmentConfig.model_validate(raw)
            except ValueError as exc:
                raise ValueError(f"variant {v.name!r} is not a valid alignment config: {exc}") from exc
        return out

    def _check_comparable(self, variant: Variant, verbatim: AlignmentConfig, base: dict) -> None:
        """A ``config:`` variant is compared with variants built from the base, so it may differ from the base only
        where the ablation varies something (a setting some variant overrides) or in bookkeeping (``BOOKKEEPING``):
        other data, initial weights or optimisation would make the comparison unfair without any sign of it."""
        try:
            reference = AlignmentConfig.model_validate(base).model_dump(mode="json")
        except ValueError as exc:
            raise ValueError(f"base {self.base} (with base_overrides) is not a valid alignment config: {exc}") from exc
        axes = {path for v in self.variants for path in flatten(v.overrides)}  # an empty override varies nothing
        if self.seeds is not None:  # every variant, this one included, then trains once per seed
            axes.add("train.seed")
        own, reference = flatten(verbatim.model_dump(mode="json")), flatten(reference)
        unfair = [path for path in sorted(set(own) | set(reference))
                  if not _same_setting(own.get(path), reference.get(path))
                  and path not in BOOKKEEPING and not any(_related(path, axis) for axis in axes)]
        if unfair:
            shown = "; ".join(f"{p}: {own.get(p)} there, {reference.get(p)} in the base" for p in unfair)
            raise ValueError(
                f"variant {variant.name!r}: {variant.config} differs from the base {self.base} (with base_overrides) in "
                f"{shown}. No variant's overrides vary these, so the variants would not be comparable; make the base "
                f"and {variant.config} agree, or give {variant.name!r} overrides of the base instead of config:")

    def training_runs(self) -> list[tuple[str, int | None, AlignmentConfig]]:
        """(variant, seed, config) of every training: one per variant, or one per (variant, seed) with ``seeds``."""
        seeds = self.seeds if self.seeds is not None else [None]
        return [(name, seed, cfg) for seed in seeds for name, cfg in self.variant_configs(seed).items()]

    def eval_datasets(self) -> list[str] | None:
        if self.eval.datasets is not None:
            return self.eval.datasets
        return next(iter(self.variant_configs().values())).data.val_datasets


# ------------------------------------------------------------------------------------------------ what to evaluate


@dataclass(frozen=True)
class ModelRef:
    variant: str  # a variant or reference name
    checkpoint: str  # "step-00000200" or "reference"
    step: int
    path: Path  # a checkpoint or saved model dir, or a .pt
    tokenizer_dir: Path
    is_best: bool = False  # the training run's own best checkpoint (by its validation metric)
    reference: Reference | None = None
    seed: int | None = None  # the training seed, when the ablation repeats training per seed


def variant_models(variant: str, training_run: dict[str, str], checkpoints: Literal["all"] | list[int],
                   seed: int | None = None) -> list[ModelRef]:
    """The checkpoints of a finished training run (``train_clipvip``'s ``training_run`` output) to evaluate."""
    run_dir = Path(training_run["run_dir"])
    found = dict(list_checkpoints(run_dir / "checkpoints"))
    if not found:
        raise CheckpointError(f"variant {variant}: no checkpoints under {run_dir / 'checkpoints'}; if the outputs "
                              "were deleted after a cached run, re-run with --no-cache")
    steps = sorted(found) if checkpoints == "all" else sorted(set(checkpoints))
    missing = [s for s in steps if s not in found]
    if missing:
        raise CheckpointError(f"variant {variant}: checkpoints at steps {missing} were not kept (kept: {sorted(found)}); "
                              "evaluate kept steps, or keep these in the variant's config (train.keep_every, or a higher "
                              "train.keep_last) and train it again: pruned checkpoints do not come back, so delete "
                              f"{run_dir} first")
    best = json.loads((found[max(found)] / STATE_FILE).read_text()).get("best_step")
    tok = Path(training_run["tokenizer_dir"])
    return [ModelRef(variant, found[s].name, s, found[s], tok, is_best=s == best, seed=seed) for s in steps]


def reference_model(label: str, ref: Reference) -> ModelRef:
    path = resolve_path(ref.path)
    tok = resolve_path(ref.tokenizer) if ref.tokenizer else path / "tokenizer"
    if not tok.is_dir():
        raise CheckpointError(f"reference {label!r}: no tokenizer at {tok}; set eval.references.{label}.tokenizer")
    return ModelRef(label, "reference", 0, path, tok, reference=ref)


def load_model(ref: ModelRef) -> CLIPViPModel:
    if ref.path.is_dir():
        return load_saved_clipvip(ref.path)
    if ref.reference is None or ref.reference.preset is None:
        raise CheckpointError(f"{ref.variant}: {ref.path} is a weights file; give its architecture with "
                              f"eval.references.{ref.variant}.preset")
    model = build_clipvip(load_preset(ref.reference.preset, ref.reference.overrides))
    load_clipvip_weights(model, ref.path)
    return model


def eval_suite(config: AblationConfig, eval_inputs: dict[str, str] | None = None) -> EvalSuite:
    """The held-out candidate sets every model is scored on. With ``eval_inputs`` (``locate_eval_data``'s output),
    the negatives and probes are the records their contracts accepted."""
    base = next(iter(config.variant_configs().values()))
    rows = read_caption_manifest(base.data.manifest_dir).select(config.eval_datasets(), config.eval.splits)
    e, found = config.eval, eval_inputs or {}

    def files(kind: str, paths: dict[str, str]) -> dict[str, Path]:
        return {d: Path(found[f"validated:{kind}:{d}"]) if f"validated:{kind}:{d}" in found else resolve_path(p)
                for d, p in paths.items()}

    return build_suite(rows, negatives=files("negatives", e.negatives), probes=files("probes", e.probes),
                       unrelated=e.unrelated, other_videos=e.other_videos, max_videos=e.max_videos, seed=e.seed)


def validate_eval_files(config: AblationConfig) -> dict[str, str]:
    """Put the negatives and probes files through their data contracts (``hard_negatives``, ``probe_pairs``):
    accepted records and the quarantine go under ``<output_dir>/eval_data``; returns, per file, the accepted
    file (``validated:<kind>:<dataset>``) and the reject count (``rejected:<kind>:<dataset>``). Raises
    ``EvalFileRejected`` when a file has more rejects than its contract allows."""
    contracts = load_contracts(resolve_path(config.contracts_dir))
    out = {}
    for kind, files in (("negatives", config.eval.negatives), ("probes", config.eval.probes)):
        for dataset, path in files.items():
            result = validate_eval_file(kind, dataset, resolve_path(path), contract_for(kind, contracts),
                                        resolve_path(config.output_dir) / "eval_data")
            out[f"validated:{kind}:{dataset}"] = str(result.accepted)
            out[f"rejected:{kind}:{dataset}"] = str(result.counts["rejected"])
    return out


def eval_fingerprints(config: AblationConfig) -> dict[str, str]:
    """Content hashes of everything evaluation reads besides the trained weights: the held-out manifest, the
    negative and probe files, the reference weights. A change to any of them re-runs the evaluation."""
    base = next(iter(config.variant_configs().values()))
    out = {"data_fingerprint": read_caption_manifest(base.data.manifest_dir).fingerprint}
    for kind, files in (("negatives", config.eval.negatives), ("probes", config.eval.probes)):
        for dataset, path in files.items():
            out[f"{kind}:{dataset}"] = sha256_file(resolve_path(path))
    for label, ref in config.eval.references.items():
        out[f"reference:{label}"] = weights_digest(resolve_path(ref.path))
    return out


# ------------------------------------------------------------------------------------------------ evaluation


@dataclass
class Evaluation:
    metrics: pd.DataFrame  # one row per model: variant, checkpoint, step, is_best, path, <metric columns>
    scores: pd.DataFrame  # one row per (model, video, text): the score matrices and probe scores
    attention: np.ndarray  # [models, videos, T, g, g] attention maps (float32)


class _Frames:
    """Model inputs of the suite's videos, decoded once per (frames, size) when caching."""

    def __init__(self, suite: EvalSuite, cache: bool):
        self.files, self.cache, self._store = suite.videos["video_file"].tolist(), cache, {}

    def get(self, i: int, num_frames: int, size: int) -> torch.Tensor:
        from hilight.data.frames import load_clip_frames

        key = (i, num_frames, size)
        if key in self._store:
            return self._store[key]
        x = load_clip_frames(self.files[i], num_frames, size)
        if self.cache:
            self._store[key] = x
        return x


@torch.no_grad()
def evaluate_models(models: list[ModelRef], suite: EvalSuite, spec: EvalSpec) -> Evaluation:
    frames = _Frames(suite, spec.cache_frames)
    metric_rows, score_tables, maps = [], [], []
    for ref in models:
        model = load_model(ref).eval().to(default_device())  # the GPU when there is one
        metrics, scores, attention = _evaluate_one(model, ref, suite, spec, frames)
        metric_rows.append({"variant": ref.variant, "seed": ref.seed, "checkpoint": ref.checkpoint, "step": ref.step,
                            "is_best": ref.is_best, "path": str(ref.path), "num_frames": model.config.num_frames,
                            "image_size": model.config.vision.image_size, **metrics})
        score_tables.append(scores.assign(variant=ref.variant, seed=ref.seed, checkpoint=ref.checkpoint, step=ref.step))
        maps.append(attention)
        log.info("%s %s: caption top-1 %.3f, hard-negative acc %.3f, short wins %.3f, t2v R@1 %.3f", ref.variant,
                 ref.checkpoint, metrics["caption/top1_accuracy"], metrics.get("caption/hard_negative_accuracy", np.nan),
                 metrics.get("say_more/short_wins", np.nan), metrics["retrieval/t2v_r1"])
    shapes = {m.shape for m in maps}
    attention = np.stack(maps) if len(shapes) == 1 else np.empty((len(maps), 0), np.float32)
    return Evaluation(pd.DataFrame(metric_rows), pd.concat(score_tables, ignore_index=True), attention)


def _evaluate_one(model: CLIPViPModel, ref: ModelRef, suite: EvalSuite, spec: EvalSpec, frames: _Frames):
    cfg = model.config
    tokenizer = load_clip_tokenizer(ref.tokenizer_dir, cfg.text.max_position_embeddings)
    n_frames, size, bs = cfg.num_frames, cfg.vision.image_size, spec.batch_size
    device = next(model.parameters()).device

    videos, maps = [], []
    n_att = min(spec.attention.videos, len(suite.videos))
    for start in range(0, len(suite.videos), bs):
        idx = range(start, min(start + bs, len(suite.videos)))
        pix = torch.stack([frames.get(i, n_frames, size) for i in idx]).to(device)
        want_att = start < n_att
        out = model.encode_video(pix, output_proxy_attentions=want_att)
        videos.append(model.video_embeds(out).float().cpu())
        if want_att:
            maps.append(frame_attention(out.proxy_attentions, num_frames=n_frames, layer=spec.attention.layer,
                                        queries=spec.attention.queries).cpu())
    v = torch.cat(videos)
    attention = torch.cat(maps)[:n_att].numpy() if maps else np.zeros((0,), np.float32)

    texts = suite.texts()
    embeds = []
    for start in range(0, len(texts), bs):
        enc = tokenizer(texts[start:start + bs], padding=True, truncation=True, return_tensors="pt").to(device)
        embeds.append(model.text_embeds(model.encode_text(enc["input_ids"], enc["attention_mask"])).float().cpu())
    t = torch.cat(embeds)
    text_index = {s: i for i, s in enumerate(texts)}
    video_index = {vid: i for i, vid in enumerate(suite.videos["video_id"])}
    scale = float(model.scale())

    def score(video_ids, strings) -> np.ndarray:
        vi = torch.tensor([video_index[x] for x in video_ids], dtype=torch.long)
        ti = torch.tensor([text_index[x] for x in strings], dtype=torch.long)
        return (scale * (v[vi] * t[ti]).sum(-1)).numpy()

    cands = suite.candidates.assign(kind="candidate", score=score(suite.candidates["video_id"], suite.candidates["text"]))
    probes = suite.probes.assign(short_score=score(suite.probes["video_id"], suite.probes["short"]),
                                 long_score=score(suite.probes["video_id"], suite.probes["long"]))
    caps = suite.captions
    sim = t[[text_index[c] for c in caps["caption"]]] @ v.T
    retrieval = retrieval_metrics(sim, torch.tensor([video_index[x] for x in caps["video_id"]]), ks=(1, 5, 10))

    metrics = {f"caption/{k}": val for k, val in caption_metrics(cands).items()}
    metrics.update({f"say_more/{k}": val for k, val in probe_metrics(probes).items()})
    metrics.update({f"retrieval/{k}": val for k, val in retrieval.items()})
    metrics["logit_scale"] = scale
    probe_rows = pd.concat([
        probes.assign(kind="probe_short", text=probes["short"], score=probes["short_score"]),
        probes.assign(kind="probe_long", text=probes["long"], score=probes["long_score"]),
    ])[["video_id", "text", "changed", "kind", "score"]].assign(category="probe", ref="")
    scores = pd.concat([cands, probe_rows.reset_index(names="pair")], ignore_index=True)
    return metrics, scores, attention


# ------------------------------------------------------------------------------------------------ selection


def clip_items(scores: pd.DataFrame, metric: str) -> pd.DataFrame | None:
    """Each held-out clip's share of ``metric`` in one model's score table, as (``num``, ``den``) indexed by
    ``video_id``: the metric over any set of clips is sum(num) / sum(den), the number ``caption_metrics`` /
    ``probe_metrics`` report over all of them. ``None`` for metrics that do not decompose over clips (retrieval
    ranks depend on the whole gallery)."""
    group, _, name = metric.partition("/")
    cands = scores[scores["kind"] == "candidate"]
    if group == "caption" and name in ("top1_accuracy", "margin", "mrr"):
        v = per_video(cands).set_index("video_id")
        value = {"top1_accuracy": v["top1"].astype(float), "margin": v["margin"].replace(np.inf, np.nan),
                 "mrr": 1.0 / v["best_gt_rank"]}[name]
        return pd.DataFrame({"num": value.fillna(0.0), "den": value.notna().astype(float)})
    if group == "caption" and name.partition("/")[0] == "hard_negative_accuracy":
        pairs = hard_negative_pairs(cands)
        if "/" in name:
            pairs = pairs[pairs["changed"] == name.partition("/")[2]]
        return _ratio_by_video(pairs["correct"].astype(float), pairs["video_id"])
    if group == "caption" and name.startswith("score/"):
        sel = cands[cands["category"] == name.removeprefix("score/")]
        return _ratio_by_video(sel["score"].astype(float), sel["video_id"])
    if group == "say_more" and name.partition("/")[0] == "short_wins":
        probes = scores[scores["kind"].isin(["probe_short", "probe_long"])]
        wide = probes.pivot_table(index=["video_id", "pair", "changed"], columns="kind", values="score").reset_index()
        if "/" in name:
            wide = wide[wide["changed"] == name.partition("/")[2]]
        return _ratio_by_video((wide["probe_short"] > wide["probe_long"]).astype(float), wide["video_id"])
    return None


def _ratio_by_video(values: pd.Series, video_ids: pd.Series) -> pd.DataFrame:
    g = values.groupby(video_ids.to_numpy())
    return pd.DataFrame({"num": g.sum(), "den": g.count().astype(float)}).rename_axis("video_id")


def select_variant(table: pd.DataFrame, rule: SelectionRule, variants: list[str],
                   scores: pd.DataFrame | None = None) -> dict:
    """Apply ``rule`` to the comparison table (one row per evaluated model); returns the winner and the evidence.

    Each training run (a variant, or a (variant, seed) pair) is represented by its best or final checkpoint; a
    variant's value is the mean over its seeds (``<metric>/sd`` their standard deviation, ``seeds`` each seed's
    checkpoint and value, ``per_seed_winners`` the winner of each seed alone). With the per-model ``scores``, each
    variant and reference gets a bootstrap interval of ``rule.metric`` over held-out clips (and over the seeds, crossed with
    the clips, when it has several), and
    ``inconclusive`` says whether the top two intervals overlap."""
    orders = [MetricOrder(metric=rule.metric, mode=rule.mode), *rule.tie_breakers]
    missing = [o.metric for o in orders if o.metric not in table.columns]
    if missing:
        metrics = sorted(c for c in table.columns if "/" in c)
        raise ValueError(f"selection metrics {missing} are not in the comparison table; choose from {metrics}")
    table = table if "seed" in table.columns else table.assign(seed=None)
    candidates = table[table["variant"].isin(variants)]
    if candidates.empty:
        raise ValueError(f"no evaluated checkpoints of variants {variants}")

    def key(row) -> tuple:
        # NaN ranks last; later keys only break ties; an earlier step wins a full tie (cheaper to reach)
        out = []
        for o in orders:
            x = float(row[o.metric])
            out.append((True, 0.0) if np.isnan(x) else (False, -x if o.mode == "max" else x))
        return (*out, row["step"])

    def pick(variant: str, rows: list) -> pd.Series:
        if rule.checkpoint == "final":
            return max(rows, key=lambda r: r["step"])
        if rule.checkpoint == "best":
            return min(rows, key=key)
        own = [r for r in rows if "is_best" in r and bool(r["is_best"])]
        if not own:
            raise ValueError(f"variant {variant}: the checkpoint its training run chose by its validation metric is not "
                             f"among the evaluated steps {sorted(int(r['step']) for r in rows)}; evaluate it "
                             f"(eval.checkpoints: all, or add its step) or set selection.checkpoint to best or final")
        return own[0]

    chosen = []  # one row per training run
    for (variant, _), g in candidates.groupby(["variant", "seed"], sort=False, dropna=False):
        chosen.append(pick(variant, [r for _, r in g.iterrows()]))
    runs = pd.DataFrame(chosen)
    runs["label"] = label_of(runs)
    metric_cols = [o.metric for o in orders]
    cols = ["variant", "checkpoint", "step", "path"] + metric_cols
    ranked = []
    for variant, g in runs.groupby("variant", sort=False):
        best = min((r for _, r in g.iterrows()), key=key)  # the variant's representative run: its best seed
        entry = {**{c: _plain(best[c]) for c in cols}, **{m: float(g[m].astype(float).mean()) for m in metric_cols}}
        entry[f"{rule.metric}/sd"] = float(g[rule.metric].astype(float).std(ddof=1)) if len(g) > 1 else None
        entry["seeds"] = [{"seed": _seed(r["seed"]), "checkpoint": r["checkpoint"], "step": _plain(r["step"]),
                           "label": r["label"], rule.metric: _plain(r[rule.metric])}
                          for _, r in g.iterrows()]
        ranked.append(entry)
    ranked.sort(key=key)
    winner = ranked[0]
    refs = table[~table["variant"].isin(variants)]
    evidence = {
        "rule": rule.model_dump(),
        "winner": winner,
        "ranking": ranked,
        "margin_over_runner_up": (abs(winner[rule.metric] - ranked[1][rule.metric]) if len(ranked) > 1 else None),
        "references": [{c: _plain(r[c]) for c in cols} for _, r in refs.iterrows()],
        "per_seed_winners": _per_seed_winners(runs, key),
    }
    if scores is not None:
        evidence.update(_intervals(rule, ranked, evidence["references"], runs, refs, scores))
    return evidence


def _seed(x) -> int | None:
    return None if x is None or (isinstance(x, float) and np.isnan(x)) else int(x)


def _per_seed_winners(runs: pd.DataFrame, key) -> dict[str, str] | None:
    if runs["seed"].isna().all():
        return None
    return {str(_seed(seed)): min((r for _, r in g.iterrows()), key=key)["variant"]
            for seed, g in runs.groupby("seed", sort=True)}


def _intervals(rule: SelectionRule, ranked: list[dict], references: list[dict], runs: pd.DataFrame,
               refs: pd.DataFrame, scores: pd.DataFrame) -> dict:
    """Bootstrap intervals of ``rule.metric`` over clips (and seeds) per variant (its runs' chosen checkpoints) and
    per reference, and whether the top two variants' intervals overlap."""
    intervals = {}
    for name, rows in [*((e["variant"], runs[runs["variant"] == e["variant"]]) for e in ranked),
                       *((r["variant"], refs[refs["variant"] == r["variant"]]) for r in references)]:
        it = _pooled_items(scores, [(r["variant"], r["step"], r["seed"]) for _, r in rows.iterrows()], rule.metric)
        intervals[name] = (None if it is None else ratio_interval(it, confidence=rule.confidence,
                                                                  n=rule.bootstrap_samples).as_dict())
    top = [e["variant"] for e in ranked[:2]]
    if len(top) < 2:
        return {"intervals": intervals, "inconclusive": False, "significance": "a single variant: nothing to compare"}
    a, b = (intervals[t] for t in top)
    if a is None or b is None:
        return {"intervals": intervals, "inconclusive": None,
                "significance": f"{rule.metric} has no per-clip decomposition, so no interval; rank by a caption/ or "
                                "say_more/ metric to get one"}
    overlap = Interval(**a).overlaps(Interval(**b))
    text = (f"{top[0]} {Interval(**a).text()} vs {top[1]} {Interval(**b).text()} on {rule.metric}: "
            + ("the intervals overlap, inconclusive" if overlap else "the intervals do not overlap"))
    return {"intervals": intervals, "inconclusive": bool(overlap), "significance": text}


def _pooled_items(scores: pd.DataFrame, models: list[tuple[str, int, int | None]], metric: str) -> pd.DataFrame | None:
    """``clip_items`` of ``metric`` of the (variant, step, seed) models' score tables, indexed by (seed, clip) so
    that an interval over several seeds resamples the seeds as well as the clips (``hilight.experiments.bootstrap``);
    ``None`` when the metric does not decompose over clips."""
    scores = scores if "seed" in scores.columns else scores.assign(seed=None)
    parts = []
    for variant, step, seed in models:
        sel = ((scores["variant"] == variant) & (scores["step"] == step)
               & (scores["seed"].isna() if _seed(seed) is None else scores["seed"] == seed))
        part = clip_items(scores[sel], metric)
        if part is None:
            return None
        parts.append(part.set_index(pd.Index([-1 if _seed(seed) is None else _seed(seed)] * len(part), name="seed"),
                                    append=True))
    return pd.concat(parts).groupby(level=["seed", "video_id"]).sum()  # a seed's checkpoints summed clip by clip


def winner_interval(selection: dict, scores: pd.DataFrame, metric: str) -> dict | None:
    """Bootstrap interval over held-out clips of any clip-decomposable ``metric`` (e.g. the colour hard negatives)
    for ``select_variant``'s winner, over its clips and its seeds' chosen checkpoints, at the rule's confidence."""
    winner, rule = selection["winner"], selection["rule"]
    items = _pooled_items(scores, [(winner["variant"], s["step"], s["seed"]) for s in winner["seeds"]], metric)
    return None if items is None else ratio_interval(items, confidence=rule["confidence"],
                                                     n=rule["bootstrap_samples"]).as_dict()


def check_significance(selection: dict, rule: SelectionRule) -> None:
    """Refuse the selection when ``rule.require_significance`` is set and it is not significant."""
    if rule.require_significance and selection.get("inconclusive") is not False:
        raise SelectionInconclusive(
            f"selection.require_significance is set and the selection is not significant: {selection.get('significance')}. "
            "Evaluate on more held-out clips, train longer or with more seeds, or unset require_significance to "
            "accept the point ranking")


def _plain(x):
    return x.item() if isinstance(x, np.generic) else x


# ------------------------------------------------------------------------------------------------ report

KEY_METRICS = ["caption/top1_accuracy", "caption/margin", "caption/hard_negative_accuracy", "say_more/short_wins",
               "retrieval/t2v_r1", "retrieval/v2t_r1"]


def label_of(frame: pd.DataFrame) -> pd.Series:
    """``variant@step`` (``variant#s<seed>@step`` when training repeats per seed); a reference keeps its name."""
    seed = frame["seed"] if "seed" in frame.columns else pd.Series(None, index=frame.index, dtype=object)
    tag = seed.map(lambda x: "" if _seed(x) is None else f"#s{_seed(x)}")
    return frame["variant"].where(frame["checkpoint"] == "reference", frame["variant"] + tag + "@" + frame["step"].astype(str))


@dataclass
class Report:
    table: pd.DataFrame  # the comparison table: one row per evaluated model
    selection: dict  # select_variant's evidence
    out_dir: Path  # comparison.parquet, selection.json, plots/, attention/


def write_report(config: AblationConfig, evaluations: list[Evaluation], suite: EvalSuite, out_dir: Path,
                 history: pd.DataFrame | None = None) -> Report:
    """Comparison table, selection, plots and attention pictures of an ablation, written under ``out_dir``."""
    from hilight.eval import plots
    from hilight.eval.attention import display_frames, overlay, save_gif, save_grid

    out_dir.mkdir(parents=True, exist_ok=True)
    table = pd.concat([e.metrics for e in evaluations], ignore_index=True)
    table.insert(0, "label", label_of(table))
    scores = pd.concat([e.scores for e in evaluations], ignore_index=True)
    scores["label"] = label_of(scores)
    table.to_parquet(out_dir / "comparison.parquet", index=False)
    scores.to_parquet(out_dir / "caption_scores.parquet", index=False)

    selection = select_variant(table, config.selection, [v.name for v in config.variants], scores)
    (out_dir / "selection.json").write_text(json.dumps(selection, indent=1))

    chosen = chosen_labels(selection)
    shown = table.set_index("label").loc[chosen].reset_index()
    metrics = list(dict.fromkeys([config.selection.metric, *[t.metric for t in config.selection.tie_breakers],
                                  *[m for m in KEY_METRICS if m in table.columns]]))
    plots.metric_bars(shown, metrics, out_dir / "plots" / "metric_bars.png")
    plots.metrics_by_checkpoint(table, metrics, out_dir / "plots" / "metrics_by_checkpoint.png")
    if history is not None and not history.empty:
        plots.loss_curves(history, out_dir / "plots" / "loss_curves.png")
    for video_id in suite.videos["video_id"][:config.eval.heatmap_videos]:
        plots.score_heatmap(scores, video_id, chosen, out_dir / "plots" / f"scores_{_slug(video_id)}.png")

    # attention: a GIF per (model, video) and a grid per video (rows: the frames, then every model)
    rows_of = [(label, e.attention[i], e.metrics.iloc[i]) for e in evaluations
               for i, label in enumerate(label_of(e.metrics))]
    n_att = min(config.eval.attention.videos, len(suite.videos))
    for j in range(n_att):
        video_id, video_file = suite.videos.iloc[j]["video_id"], suite.videos.iloc[j]["video_file"]
        slug, grid, shown_frames = _slug(video_id), [], {}
        for label, att, meta in rows_of:
            if att.ndim != 4 or j >= len(att):
                continue
            key = (int(meta["num_frames"]), int(meta["image_size"]))
            if key not in shown_frames:
                shown_frames[key] = display_frames(video_file, *key)
                grid.append((f"frames {key[1]}px", shown_frames[key]))
            pictures = overlay(shown_frames[key], att[j], alpha=config.eval.attention.alpha)
            save_gif(pictures, out_dir / "attention" / slug / f"{_slug(label)}.gif",
                     fps=config.eval.attention.fps)
            grid.append((label, pictures))
        if grid:
            save_grid(grid, out_dir / "attention" / f"{slug}.png",
                      title=f"{video_id}: attention of encoder layer {config.eval.attention.layer} "
                            f"({config.eval.attention.queries} proxy queries -> each frame's patches)")
    return Report(table, selection, out_dir)


def chosen_labels(selection: dict) -> list[str]:
    """The comparison-table labels of each variant's chosen checkpoint(s), in ranking order, then the references."""
    return [sd["label"] for r in selection["ranking"] for sd in r["seeds"]] + [r["variant"] for r in selection["references"]]


def _slug(video_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", video_id)
