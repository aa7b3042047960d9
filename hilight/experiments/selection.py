"""Choosing the CLIP-ViP weights by metrics (research notes §5–§7): each candidate goes through stage 1 → stage 2 →
merge → evaluation with the same configs, and a declared rule picks the winner.

The notes' own finding is the reason for the guard: "table1k" weights were better on billiards and "original"
weights generalised better. The default rule therefore ranks candidates by a billiards metric, but only among those
whose general-set metric is within ``tolerance`` of the best candidate's, so a billiards gain bought with a
collapse on general videos does not win.

``SelectionConfig.candidate_configs(name)`` derives each candidate's stage-1 and stage-2 configs from two base YAMLs:
only the CLIP-ViP weights and the output directories differ between candidates; stage 2 inherits the vision towers,
the LLM, the TokenMining shape and the feature cache from stage 1, and starts from that candidate's stage-1
TokenMining.
"""

from __future__ import annotations

import re
from typing import Literal

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from hilight.config import deep_merge
from hilight.env import resolve_path
from hilight.eval.vlm import VLMEvalSpec
from hilight.models.export import GenerationSpec
from hilight.train.lora import LoRAFinetuneConfig
from hilight.train.tokenmining import TokenMiningPretrainConfig

NAME = r"^[A-Za-z0-9_.-]+$"


class Candidate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    clipvip: str  # saved model dir (alignment export) or an original-layout .pt
    clipvip_preset: str = "clipvip-b16"  # architecture of a .pt file
    description: str = ""


class MetricOrder(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metric: str
    mode: Literal["max", "min"] = "max"


class Guard(MetricOrder):
    tolerance: float = Field(0.05, ge=0)  # allowed distance from the best candidate on this metric


class SelectionRule(BaseModel):
    """Candidates failing a guard are out; the rest are ranked by ``primary``, then each tie-breaker."""

    model_config = ConfigDict(extra="forbid")

    primary: MetricOrder = Field(default_factory=lambda: MetricOrder(metric="billiards/fact_accuracy"))
    guards: list[Guard] = Field(default_factory=lambda: [Guard(metric="general/fact_accuracy")])
    tie_breakers: list[MetricOrder] = Field(default_factory=lambda: [MetricOrder(metric="billiards/describe/rougeL")])

    def describe(self) -> str:
        guards = "; ".join(f"{g.metric} within {g.tolerance:g} of the best" for g in self.guards) or "no guard"
        ties = ", ".join(f"{t.mode} {t.metric}" for t in self.tie_breakers) or "none"
        return f"{self.primary.mode} {self.primary.metric} among candidates with {guards} (tie-breakers: {ties})"


class RegistrySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_name: str = "hilight-vlm"
    champion_alias: str = "champion"
    challenger_alias: str = "challenger"


class SelectionConfig(BaseModel):
    """Config of the ``select_vision_weights`` pipeline (``configs/select_vision_weights_*.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    pipeline: Literal["select_vision_weights"] = "select_vision_weights"
    experiment_name: str = "select_vision_weights"
    name: str = Field("selection", pattern=NAME)
    output_dir: str = "outputs/selection"  # candidate C writes under <output_dir>/<C>/{tokenmining,lora,merged}
    candidates: dict[str, Candidate] = Field(min_length=2)
    stage1: str  # a tokenmining_pretrain YAML
    stage1_overrides: dict = Field(default_factory=dict)
    stage2: str  # a lora_finetune YAML
    stage2_overrides: dict = Field(default_factory=dict)
    evaluation: VLMEvalSpec = Field(default_factory=VLMEvalSpec)
    rule: SelectionRule = Field(default_factory=SelectionRule)
    registry: RegistrySpec = Field(default_factory=RegistrySpec)
    enable_cache: bool = True

    @model_validator(mode="after")
    def _check(self) -> SelectionConfig:
        bad = [c for c in self.candidates if not re.match(NAME, c)]
        if bad:
            raise ValueError(f"candidate names {bad} must match {NAME}")
        for name in self.candidates:  # every candidate's stage configs must validate; fail now, naming it
            self.candidate_configs(name)
        return self

    def _base(self, path: str, overrides: dict) -> dict:
        file = resolve_path(path)
        if not file.is_file():
            raise ValueError(f"base config {file} does not exist")
        return deep_merge(yaml.safe_load(file.read_text(encoding="utf-8")), overrides)

    def candidate_dir(self, name: str) -> str:
        return f"{self.output_dir}/{name}"

    def merged_dir(self, name: str) -> str:
        return f"{self.candidate_dir(name)}/merged"

    def candidate_configs(self, name: str) -> tuple[TokenMiningPretrainConfig, LoRAFinetuneConfig]:
        c, out = self.candidates[name], self.candidate_dir(name)
        s1 = self._base(self.stage1, self.stage1_overrides)
        s1["vision"] = {**s1.get("vision", {}), "clipvip": c.clipvip, "clipvip_preset": c.clipvip_preset}
        s1.update(name=f"{self.name}-{name}-stage1", output_dir=f"{out}/tokenmining",
                  experiment_name=self.experiment_name, enable_cache=self.enable_cache)
        try:
            stage1 = TokenMiningPretrainConfig.model_validate(s1)
        except ValueError as exc:
            raise ValueError(f"candidate {name!r}: not a valid stage-1 config: {exc}") from exc
        s2 = self._base(self.stage2, self.stage2_overrides)
        tm = stage1.token_mining.model_dump(mode="json")
        s2.update(name=f"{self.name}-{name}-stage2", output_dir=f"{out}/lora", experiment_name=self.experiment_name,
                  enable_cache=self.enable_cache, vision=stage1.vision.model_dump(mode="json"),
                  llm=stage1.llm.model_dump(mode="json"), features=stage1.features.model_dump(mode="json"),
                  token_mining={**tm, "init": f"{stage1.output_dir}/best"})
        try:
            stage2 = LoRAFinetuneConfig.model_validate(s2)
        except ValueError as exc:
            raise ValueError(f"candidate {name!r}: not a valid stage-2 config: {exc}") from exc
        return stage1, stage2

    @property
    def generation(self) -> GenerationSpec:
        return self.evaluation.generation


def decide(table: pd.DataFrame, rule: SelectionRule) -> dict:
    """Apply ``rule`` to one row per candidate (``candidate`` + metric columns). Returns the winner, the ranking,
    and each candidate's guard results, all plain values for JSON."""
    metrics = [rule.primary.metric, *(g.metric for g in rule.guards), *(t.metric for t in rule.tie_breakers)]
    missing = sorted({m for m in metrics if m not in table.columns})
    if missing:
        known = sorted(c for c in table.columns if "/" in c)
        raise ValueError(f"selection metrics {missing} were not measured; choose from {known}")
    rows = table.set_index("candidate")
    passed = pd.Series(True, index=rows.index)
    guard_notes = {}
    for g in rule.guards:
        col = rows[g.metric].astype(float)
        best = col.max() if g.mode == "max" else col.min()
        ok = (col >= best - g.tolerance) if g.mode == "max" else (col <= best + g.tolerance)
        ok &= col.notna()
        guard_notes[g.metric] = {c: {"value": _plain(col[c]), "best": _plain(best), "passed": bool(ok[c])} for c in rows.index}
        passed &= ok

    def key(c: str) -> tuple:
        out = []
        for o in (rule.primary, *rule.tie_breakers):
            x = float(rows.at[c, o.metric])
            out.append((True, 0.0) if np.isnan(x) else (False, -x if o.mode == "max" else x))
        return (not passed[c], *out, c)  # guard failures last; a full tie goes to the first name

    ranking = sorted(rows.index, key=key)
    if not passed[ranking[0]]:
        raise ValueError(f"no candidate passes the guards {[g.metric for g in rule.guards]}; the metrics are NaN")
    cols = list(dict.fromkeys(metrics))
    ranked = [{"candidate": c, "passed_guards": bool(passed[c]), **{m: _plain(rows.at[c, m]) for m in cols}}
              for c in ranking]
    p = rule.primary.metric
    margin = abs(ranked[0][p] - ranked[1][p]) if len(ranked) > 1 else None
    return {"rule": rule.model_dump(), "rule_text": rule.describe(), "winner": ranking[0],
            "runner_up": ranking[1] if len(ranking) > 1 else None, "ranking": ranked, "guards": guard_notes,
            "margin": margin}


def _plain(x):
    return x.item() if isinstance(x, np.generic) else x


def per_item(answers: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Each answer's share of a summary metric as (``num``, ``den``): the metric over any set of answers is
    sum(num) / sum(den) (fact checks pool over checks, text metrics average over answers). Indexed by (video_id,
    kind, question) so two models' answers pair up. Metrics: ``<dataset>/fact_accuracy``,
    ``<dataset>/fact/<kind>``, ``<dataset>/<kind>/<column>``."""
    dataset, _, rest = metric.partition("/")
    rows = answers[answers["dataset"] == dataset].set_index(["video_id", "kind", "question"])
    if rest == "fact_accuracy" or rest.startswith("fact/"):
        cols = [c for c in rows.columns if c.startswith("fact_")] if rest == "fact_accuracy" else [f"fact_{rest[5:]}"]
        checks = rows[cols].astype(float)
        return pd.DataFrame({"num": checks.sum(axis=1, min_count=1).fillna(0.0), "den": checks.notna().sum(axis=1)})
    kind, _, column = rest.partition("/")
    if column not in rows.columns:
        raise ValueError(f"cannot pair answers on {metric!r}: no per-answer column {column!r}")
    values = rows.loc[rows.index.get_level_values("kind") == kind, column].astype(float)
    return pd.DataFrame({"num": values.fillna(0.0), "den": values.notna().astype(float)})


def paired_difference(a: pd.DataFrame, b: pd.DataFrame, metric: str, *, n: int = 2000,
                      seed: int = 0) -> tuple[float, float, float]:
    """``metric`` of model a minus model b over the questions both answered, with a 95% bootstrap interval
    (questions resampled together for both): how sure the decision is, given the size of the evaluation set."""
    pa, pb = per_item(a, metric), per_item(b, metric)
    both = pa.join(pb, how="inner", lsuffix="_a", rsuffix="_b")
    both = both[(both["den_a"] > 0) & (both["den_b"] > 0)]
    if both.empty:
        return float("nan"), float("nan"), float("nan")
    v = both[["num_a", "den_a", "num_b", "den_b"]].to_numpy()
    idx = np.random.default_rng(seed).integers(0, len(v), (n, len(v)))
    s = v[idx].sum(axis=1)  # [n, 4]
    boot = s[:, 0] / s[:, 1] - s[:, 2] / s[:, 3]
    t = v.sum(axis=0)
    return float(t[0] / t[1] - t[2] / t[3]), float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))
