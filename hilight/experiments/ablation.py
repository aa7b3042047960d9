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
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from hilight.config import deep_merge
from hilight.data.captions import read_caption_manifest
from hilight.data.probe import sha256_file
from hilight.env import resolve_path
from hilight.eval.attention import frame_attention
from hilight.eval.caption_scores import EvalSuite, build_suite, caption_metrics, probe_metrics
from hilight.eval.retrieval import retrieval_metrics
from hilight.models.checkpoints import CheckpointError, load_clipvip_weights, load_saved_clipvip, weights_digest
from hilight.models.clipvip import CLIPViPModel, build_clipvip, load_preset
from hilight.models.tokenizers import load_clip_tokenizer
from hilight.train.alignment import AlignmentConfig
from hilight.train.checkpoint import STATE_FILE, list_checkpoints

log = logging.getLogger(__name__)

NAME = r"^[A-Za-z0-9_.-]+$"
# the notes' out-of-domain captions (§3.1.2: "People are smoking.", "Cat on the table.") and two more
UNRELATED = ["People are smoking.", "Cat on the table.", "A chef is chopping onions in a kitchen.",
             "A dog runs across a snowy field."]


class Variant(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME)  # e.g. BP_WithMask (the notes' names)
    overrides: dict = Field(default_factory=dict)  # nested overrides of the base alignment config
    description: str = ""


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
    """Each variant is represented by its best evaluated checkpoint (``checkpoint: best``) or its last one
    (``final``); variants are ranked by ``metric``, then each tie-breaker; references are never selected."""

    metric: str = "caption/top1_accuracy"
    checkpoint: Literal["best", "final"] = "best"
    tie_breakers: list[MetricOrder] = Field(default_factory=lambda: [MetricOrder(metric="caption/margin")])


class AblationConfig(BaseModel):
    """Config of the ``alignment_ablation`` pipeline (``configs/ablation_*.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    pipeline: Literal["alignment_ablation"] = "alignment_ablation"
    experiment_name: str = "alignment_ablation"
    name: str = Field("ablation", pattern=NAME)
    base: str  # a clipvip_alignment YAML every variant starts from
    base_overrides: dict = Field(default_factory=dict)  # applied to every variant before its own overrides
    output_dir: str = "outputs/ablation"  # variant V trains under <output_dir>/<V>
    variants: list[Variant] = Field(min_length=1)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    selection: SelectionRule = Field(default_factory=SelectionRule)
    enable_cache: bool = True

    @model_validator(mode="after")
    def _check(self) -> AblationConfig:
        names = [v.name for v in self.variants]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"variant names must be unique; repeated: {dupes}")
        clash = sorted(set(names) & set(self.eval.references))
        if clash:
            raise ValueError(f"{clash} name both a variant and a reference; rename one")
        self.variant_configs()  # every variant must be a valid alignment config; fail now, naming it
        return self

    def variant_configs(self) -> dict[str, AlignmentConfig]:
        path = resolve_path(self.base)
        if not path.is_file():
            raise ValueError(f"base alignment config {path} does not exist")
        base = yaml.safe_load(path.read_text(encoding="utf-8"))
        base = deep_merge(base, self.base_overrides)
        out = {}
        for v in self.variants:
            raw = deep_merge(base, v.overrides)
            raw.update(name=f"{self.name}-{v.name}", output_dir=f"{self.output_dir}/{v.name}",
                       experiment_name=self.experiment_name, enable_cache=self.enable_cache)
            try:
                out[v.name] = AlignmentConfig.model_validate(raw)
            except ValueError as exc:
                raise ValueError(f"variant {v.name!r} is not a valid alignment config: {exc}") from exc
        return out

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


def variant_models(variant: str, training_run: dict[str, str], checkpoints: Literal["all"] | list[int]) -> list[ModelRef]:
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
                              "evaluate kept steps or raise train.keep_last in the base config")
    best = json.loads((found[max(found)] / STATE_FILE).read_text()).get("best_step")
    tok = Path(training_run["tokenizer_dir"])
    return [ModelRef(variant, found[s].name, s, found[s], tok, is_best=s == best) for s in steps]


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


def eval_suite(config: AblationConfig) -> EvalSuite:
    """The held-out candidate sets every model is scored on."""
    base = next(iter(config.variant_configs().values()))
    rows = read_caption_manifest(base.data.manifest_dir).select(config.eval_datasets(), config.eval.splits)
    e = config.eval
    return build_suite(rows, negatives={d: resolve_path(p) for d, p in e.negatives.items()},
                       probes={d: resolve_path(p) for d, p in e.probes.items()}, unrelated=e.unrelated,
                       other_videos=e.other_videos, max_videos=e.max_videos, seed=e.seed)


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
        model = load_model(ref).eval()
        metrics, scores, attention = _evaluate_one(model, ref, suite, spec, frames)
        metric_rows.append({"variant": ref.variant, "checkpoint": ref.checkpoint, "step": ref.step,
                            "is_best": ref.is_best, "path": str(ref.path), "num_frames": model.config.num_frames,
                            "image_size": model.config.vision.image_size, **metrics})
        score_tables.append(scores.assign(variant=ref.variant, checkpoint=ref.checkpoint, step=ref.step))
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

    videos, maps = [], []
    n_att = min(spec.attention.videos, len(suite.videos))
    for start in range(0, len(suite.videos), bs):
        idx = range(start, min(start + bs, len(suite.videos)))
        pix = torch.stack([frames.get(i, n_frames, size) for i in idx])
        want_att = start < n_att
        out = model.encode_video(pix, output_proxy_attentions=want_att)
        videos.append(model.video_embeds(out).float())
        if want_att:
            maps.append(frame_attention(out.proxy_attentions, num_frames=n_frames, layer=spec.attention.layer,
                                        queries=spec.attention.queries))
    v = torch.cat(videos)
    attention = torch.cat(maps)[:n_att].numpy() if maps else np.zeros((0,), np.float32)

    texts = suite.texts()
    embeds = []
    for start in range(0, len(texts), bs):
        enc = tokenizer(texts[start:start + bs], padding=True, truncation=True, return_tensors="pt")
        embeds.append(model.text_embeds(model.encode_text(enc["input_ids"], enc["attention_mask"])).float())
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


def select_variant(table: pd.DataFrame, rule: SelectionRule, variants: list[str]) -> dict:
    """Apply ``rule`` to the comparison table (one row per evaluated model); returns the winner and the evidence."""
    orders = [MetricOrder(metric=rule.metric, mode=rule.mode), *rule.tie_breakers]
    missing = [o.metric for o in orders if o.metric not in table.columns]
    if missing:
        metrics = sorted(c for c in table.columns if "/" in c)
        raise ValueError(f"selection metrics {missing} are not in the comparison table; choose from {metrics}")
    candidates = table[table["variant"].isin(variants)]
    if candidates.empty:
        raise ValueError(f"no evaluated checkpoints of variants {variants}")

    def key(row: pd.Series) -> tuple:
        # NaN ranks last; later keys only break ties; an earlier step wins a full tie (cheaper to reach)
        out = []
        for o in orders:
            x = float(row[o.metric])
            out.append((True, 0.0) if np.isnan(x) else (False, -x if o.mode == "max" else x))
        return (*out, row["step"])

    chosen = []
    for _, g in candidates.groupby("variant", sort=False):
        rows = [r for _, r in g.iterrows()]
        chosen.append(max(rows, key=lambda r: r["step"]) if rule.checkpoint == "final" else min(rows, key=key))
    ranking = sorted(chosen, key=key)
    cols = ["variant", "checkpoint", "step", "path"] + [o.metric for o in orders]
    ranked = [{c: _plain(r[c]) for c in cols} for r in ranking]
    winner = ranked[0]
    refs = table[~table["variant"].isin(variants)]
    evidence = {
        "rule": rule.model_dump(),
        "winner": winner,
        "ranking": ranked,
        "margin_over_runner_up": (abs(winner[rule.metric] - ranked[1][rule.metric]) if len(ranked) > 1 else None),
        "references": [{c: _plain(r[c]) for c in cols} for _, r in refs.iterrows()],
    }
    return evidence


def _plain(x):
    return x.item() if isinstance(x, np.generic) else x


# ------------------------------------------------------------------------------------------------ report

KEY_METRICS = ["caption/top1_accuracy", "caption/margin", "caption/hard_negative_accuracy", "say_more/short_wins",
               "retrieval/t2v_r1", "retrieval/v2t_r1"]


def label_of(frame: pd.DataFrame) -> pd.Series:
    return frame["variant"].where(frame["checkpoint"] == "reference", frame["variant"] + "@" + frame["step"].astype(str))


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

    selection = select_variant(table, config.selection, [v.name for v in config.variants])
    (out_dir / "selection.json").write_text(json.dumps(selection, indent=1))

    chosen = [f"{r['variant']}@{r['step']}" for r in selection["ranking"]] + [r["variant"] for r in selection["references"]]
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


def _slug(video_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", video_id)
