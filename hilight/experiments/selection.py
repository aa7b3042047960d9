"""Choosing a HiLight model by metrics (research notes §4.1, §5–§7): each candidate goes through stage 1 → stage 2
→ merge → evaluation, and a declared rule picks the winner, which must then beat the incumbent champion.

The notes' own finding is the reason for the guard: "table1k" weights were better on billiards and "original"
weights generalised better. The default rule therefore ranks candidates by a billiards metric, but only among those
whose general-set metric is within ``tolerance`` of the best model's, so a billiards gain bought with a collapse on
general videos does not win.

A candidate is a set of overrides of two base YAMLs (``SelectionConfig.candidate_configs``): the CLIP-ViP weights
(``clipvip:``) and any stage-1 / stage-2 setting (``stage1:`` / ``stage2:``, e.g. ``token_mining.depth``,
``lora.tune_token_mining``, ``data.mode``), validated by the stage config models. Stage 2 inherits the vision towers,
the LLM, the TokenMining shape and the feature cache from stage 1, and starts from that candidate's stage-1
TokenMining.

Promotion is gated (``decide``): when a champion exists it is evaluated on the same evaluation sets, and the best new
candidate takes ``champion`` only if it passes the guards and the paired bootstrap lower bound of its primary-metric
margin over the incumbent exceeds ``rule.min_effect``; otherwise the incumbent stays and the candidate becomes the
``challenger``, and the decision names the condition that held it back.
"""

from __future__ import annotations

import re
from typing import Literal

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from hilight.config import deep_merge
from hilight.data.contracts import load_contracts
from hilight.data.eval_files import contract_for, validate_eval_file
from hilight.env import resolve_path
from hilight.eval.choice import CHOICE_KINDS
from hilight.eval.facts import FACT_KINDS
from hilight.eval.vlm import CHOICE_FAMILIES, VLMEvalSpec, checks_as_float, metric_problem
from hilight.experiments.bootstrap import paired_ratio_difference, ratio_interval, seeds_text
from hilight.models.export import GenerationSpec
from hilight.train.lora import LoRAFinetuneConfig
from hilight.train.tokenmining import TokenMiningPretrainConfig

NAME = r"^[A-Za-z0-9_.-]+$"
INHERITED = ("vision", "llm", "features", "token_mining")  # stage 2 takes these from stage 1


class Candidate(BaseModel):
    """What one candidate changes in the base configs: the CLIP-ViP weights and/or any stage-1 / stage-2 setting."""

    model_config = ConfigDict(extra="forbid")

    clipvip: str | None = None  # saved model dir (alignment export) or an original-layout .pt; None = the base's
    clipvip_preset: str | None = None  # architecture of a .pt file; None = the base's
    stage1: dict = Field(default_factory=dict)  # nested overrides of the stage-1 config, e.g. {token_mining: {depth: attn_mlp}}
    stage2: dict = Field(default_factory=dict)  # nested overrides of the stage-2 config, e.g. {lora: {tune_token_mining: false}}
    description: str = ""

    @model_validator(mode="after")
    def _check(self) -> Candidate:
        owned = sorted({"name", "output_dir", "experiment_name", "enable_cache"} & (set(self.stage1) | set(self.stage2)))
        if owned:
            raise ValueError(f"{owned} are set by the selection config for every candidate; remove them from the "
                             "candidate's stage1/stage2 overrides")
        inherited = sorted(set(INHERITED) & set(self.stage2))
        if inherited:
            raise ValueError(f"stage 2 inherits {inherited} from stage 1; set them under the candidate's stage1: instead")
        return self


class MetricOrder(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metric: str
    mode: Literal["max", "min"] = "max"


class Guard(MetricOrder):
    tolerance: float = Field(0.05, ge=0)  # allowed distance from the best candidate on this metric
    # how that distance is judged: "interval" (with per-answer tables): a model fails only when the lower bound of
    # the paired bootstrap interval of its loss against the best exceeds the tolerance, i.e. the evaluation shows a
    # larger loss, not one that a different sample of questions would undo; "estimate": the point values alone
    test: Literal["interval", "estimate"] = "interval"


class SelectionRule(BaseModel):
    """Candidates failing a guard are out; the rest are ranked by ``primary``, then each tie-breaker. Against an
    incumbent champion, the best candidate must also win by more than ``min_effect`` at ``confidence``: the lower
    bound of the paired bootstrap interval of its primary-metric margin must exceed ``min_effect``."""

    model_config = ConfigDict(extra="forbid")

    primary: MetricOrder = Field(default_factory=lambda: MetricOrder(metric="billiards/fact_accuracy"))
    guards: list[Guard] = Field(default_factory=lambda: [Guard(metric="general/fact_accuracy")])
    tie_breakers: list[MetricOrder] = Field(default_factory=lambda: [MetricOrder(metric="billiards/describe/rougeL")])
    min_effect: float = Field(0.0, ge=0)  # the margin over the incumbent a promotion must clear (primary-metric units)
    confidence: float = Field(0.95, gt=0, lt=1)  # of the two-sided bootstrap intervals
    bootstrap_samples: int = Field(2000, ge=100)

    def describe(self) -> str:
        guards = "; ".join(f"{g.metric} within {g.tolerance:g} of the best"
                           + (f" ({self.confidence:.0%} interval)" if g.test == "interval" else "")
                           for g in self.guards) or "no guard"
        ties = ", ".join(f"{t.mode} {t.metric}" for t in self.tie_breakers) or "none"
        return (f"{self.primary.mode} {self.primary.metric} among candidates with {guards} (tie-breakers: {ties}); "
                f"against a champion, the {self.confidence:.0%} lower bound of the margin must exceed {self.min_effect:g}")


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
    # candidate C writes under <output_dir>/<C>/{tokenmining,lora,merged}; one whose stage-1 settings are an earlier
    # candidate's starts from that one's tokenmining (``stage1_owner``)
    output_dir: str = "outputs/selection"
    candidates: dict[str, Candidate] = Field(min_length=2)
    seeds: list[int] | None = Field(None, min_length=1)  # train every candidate once per seed (train.seed of both stages)
    stage1: str  # a tokenmining_pretrain YAML
    stage1_overrides: dict = Field(default_factory=dict)
    stage2: str  # a lora_finetune YAML
    stage2_overrides: dict = Field(default_factory=dict)
    evaluation: VLMEvalSpec = Field(default_factory=VLMEvalSpec)
    rule: SelectionRule = Field(default_factory=SelectionRule)
    registry: RegistrySpec = Field(default_factory=RegistrySpec)
    contracts_dir: str = "data_contracts"  # evaluation.events files are validated by its event_logs contract
    enable_cache: bool = True

    @model_validator(mode="after")
    def _check(self) -> SelectionConfig:
        bad = [c for c in self.candidates if not re.match(NAME, c)]
        if bad:
            raise ValueError(f"candidate names {bad} must match {NAME}")
        if self.seeds is not None and len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds {self.seeds} repeat a value; list each seed once")
        for name in self.candidates:  # every candidate's stage configs must validate; fail now, naming it
            self.candidate_configs(name)
        rule = self.rule
        wrong = [f"{where}: {problem}" for where, m in [("rule.primary", rule.primary),
                                                       *((f"rule.guards[{i}]", g) for i, g in enumerate(rule.guards)),
                                                       *((f"rule.tie_breakers[{i}]", t)
                                                         for i, t in enumerate(rule.tie_breakers))]
                 if (problem := metric_problem(m.metric, self.evaluation))]
        if wrong:  # now, not after every candidate has trained
            raise ValueError("the rule names metrics this evaluation will not measure:\n  - " + "\n  - ".join(wrong))
        return self

    def _base(self, path: str, overrides: dict) -> dict:
        file = resolve_path(path)
        if not file.is_file():
            raise ValueError(f"base config {file} does not exist")
        return deep_merge(yaml.safe_load(file.read_text(encoding="utf-8")), overrides)

    def runs(self) -> list[tuple[str, int | None]]:
        """(candidate, seed) of every training: one per candidate, or one per (candidate, seed) with ``seeds``."""
        return [(name, seed) for name in self.candidates for seed in (self.seeds or [None])]

    @staticmethod
    def run_key(name: str, seed: int | None) -> str:
        return name if seed is None else f"{name}_seed{seed}"

    def candidate_dir(self, name: str, seed: int | None = None) -> str:
        return f"{self.output_dir}/{name}" + ("" if seed is None else f"/seed{seed}")

    def merged_dir(self, name: str, seed: int | None = None) -> str:
        return f"{self.candidate_dir(name, seed)}/merged"

    def _stage1_settings(self, name: str, seed: int | None) -> dict:
        """Candidate ``name``'s stage-1 config (at ``seed``) before its name and output directory are set."""
        c = self.candidates[name]
        seeded = {} if seed is None else {"train": {"seed": seed}}
        s1 = deep_merge(deep_merge(self._base(self.stage1, self.stage1_overrides), c.stage1), seeded)
        weights = {k: v for k, v in (("clipvip", c.clipvip), ("clipvip_preset", c.clipvip_preset)) if v is not None}
        s1["vision"] = {**s1.get("vision", {}), **weights}
        return s1

    def stage1_owner(self, name: str, seed: int | None = None) -> str:
        """The candidate whose stage-1 run candidate ``name`` starts stage 2 from: the first one (in config order)
        with the same stage-1 settings. Candidates that differ only in stage 2 (§7.1 vs §7.2, mix vs sequence)
        share one stage-1 training: the same weights a second run would give, at half the cost (at real shapes,
        TokenMining on Valley-703K through a frozen Gemma-2B), and their comparison is then about stage 2 alone."""
        mine = self._stage1_settings(name, seed)
        return next(n for n in self.candidates if n == name or self._stage1_settings(n, seed) == mine)

    def candidate_configs(self, name: str, seed: int | None = None) -> tuple[TokenMiningPretrainConfig, LoRAFinetuneConfig]:
        out = self.candidate_dir(name, seed)
        key = self.run_key(name, seed).replace("_seed", "-seed")
        seeded = {} if seed is None else {"train": {"seed": seed}}
        c, owner = self.candidates[name], self.stage1_owner(name, seed)
        s1 = self._stage1_settings(name, seed)
        s1.update(name=f"{self.name}-{self.run_key(owner, seed).replace('_seed', '-seed')}-stage1",
                  output_dir=f"{self.candidate_dir(owner, seed)}/tokenmining",
                  experiment_name=self.experiment_name, enable_cache=self.enable_cache)
        try:
            stage1 = TokenMiningPretrainConfig.model_validate(s1)
        except ValueError as exc:
            raise ValueError(f"candidate {name!r}: not a valid stage-1 config: {exc}") from exc
        s2 = deep_merge(deep_merge(self._base(self.stage2, self.stage2_overrides), c.stage2), seeded)
        tm = stage1.token_mining.model_dump(mode="json")
        s2.update(name=f"{self.name}-{key}-stage2", output_dir=f"{out}/lora", experiment_name=self.experiment_name,
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


def validate_event_logs(spec: VLMEvalSpec, contracts_dir: str, out_dir: str) -> dict[str, str]:
    """Put ``spec.events`` through the ``event_logs`` contract (quarantine under ``<out_dir>/eval_data``); returns
    the reject count per dataset (``rejected:events:<dataset>``). The evaluation reads the files whole, so the
    contract tolerates no reject (``EvalFileRejected`` names the records and reasons)."""
    contract = contract_for("events", load_contracts(resolve_path(contracts_dir)))
    out = {}
    for dataset, path in spec.events.items():
        result = validate_eval_file("events", dataset, resolve_path(path), contract,
                                    resolve_path(out_dir) / "eval_data")
        out[f"rejected:events:{dataset}"] = str(result.counts["rejected"])
    return out


def decide(table: pd.DataFrame, rule: SelectionRule, *, answers: dict[str, pd.DataFrame] | None = None,
           incumbent: dict | None = None) -> dict:
    """Apply ``rule`` to one row per model (``candidate`` + metric columns; a ``digest`` column identifies models).

    ``incumbent`` (the current champion: ``label``, ``version``, ``digest``) adds its row, named ``label``, to
    ``table``: it counts for the guards' "best" but is not ranked; the best new candidate (``winner``) must then
    pass the guards and beat it by more than ``rule.min_effect`` at the lower bound of the paired bootstrap interval
    over ``answers`` (per-answer tables by model name). Returns plain values for JSON: ``winner``, ``runner_up``,
    ``ranking``, ``guards``, ``margin`` (winner − runner-up), ``intervals`` (each model's primary metric),
    ``primary_difference``, and the promotion: ``status`` (``first`` | ``promoted`` | ``held_back`` |
    ``unchanged``), ``champion`` / ``challenger`` (model names), ``promoted`` and ``held_back`` (the reasons)."""
    metrics = [rule.primary.metric, *(g.metric for g in rule.guards), *(t.metric for t in rule.tie_breakers)]
    missing = sorted({m for m in metrics if m not in table.columns})
    if missing:
        known = sorted(c for c in table.columns if "/" in c)
        raise ValueError(f"selection metrics {missing} were not measured; choose from {known}")
    inc = incumbent["label"] if incumbent else None
    if inc is not None and inc not in set(table["candidate"]):
        raise ValueError(f"the incumbent {inc!r} has no row in the evidence table")
    if inc is not None and answers is None:
        raise ValueError("deciding against an incumbent needs the per-answer tables (answers=) for the paired interval")
    rows = table.set_index("candidate")
    passed = pd.Series(True, index=rows.index)
    guard_notes = {}
    for g in rule.guards:
        guard_notes[g.metric] = _guard(rule, g, rows[g.metric].astype(float), answers)
        passed &= pd.Series({c: note["passed"] for c, note in guard_notes[g.metric].items()})

    def key(c: str) -> tuple:
        out = []
        for o in (rule.primary, *rule.tie_breakers):
            x = float(rows.at[c, o.metric])
            out.append((True, 0.0) if np.isnan(x) else (False, -x if o.mode == "max" else x))
        return (not passed[c], *out, c)  # guard failures last; a full tie goes to the first name

    ranking = sorted((c for c in rows.index if c != inc), key=key)
    if not ranking:
        raise ValueError("no new candidate to decide on")
    if not passed[ranking[0]] and inc is None:
        raise ValueError(f"no candidate passes the guards {[g.metric for g in rule.guards]}; the metrics are NaN")
    cols = list(dict.fromkeys(metrics))
    ranked = [{"candidate": c, "passed_guards": bool(passed[c]), **{m: _plain(rows.at[c, m]) for m in cols}}
              for c in ranking]
    p = rule.primary.metric
    winner, runner_up = ranking[0], (ranking[1] if len(ranking) > 1 else None)
    out = {"rule": rule.model_dump(), "rule_text": rule.describe(), "winner": winner, "runner_up": runner_up,
           "ranking": ranked, "guards": guard_notes,
           "margin": abs(ranked[0][p] - ranked[1][p]) if runner_up else None, "incumbent": incumbent}
    if answers is not None:
        items = {name: per_item(a, p) for name, a in answers.items() if name in rows.index}
        out["intervals"] = {name: _interval(rule, ratio_interval, it) for name, it in items.items()}
        if runner_up:
            out["primary_difference"] = _difference(rule, items[winner], items[runner_up], winner, runner_up)
        if inc is not None:
            out["against_incumbent"] = {c: _difference(rule, items[c], items[inc], c, inc) for c in ranking}
    out.update(_promotion(rule, rows, passed, guard_notes, winner, runner_up, incumbent, out.get("against_incumbent")))
    return out


def _guard(rule: SelectionRule, g: Guard, col: pd.Series, answers: dict[str, pd.DataFrame] | None) -> dict:
    """Per model: its value, the best model's, its loss against the best (with the paired interval when judged by
    interval) and whether it passed. Without per-answer tables a guard is judged on the point values."""
    if col.isna().all():
        return {c: {"value": None, "best": None, "best_model": None, "passed": False, "test": "estimate"} for c in col.index}
    best_model = col.idxmax() if g.mode == "max" else col.idxmin()
    best = col[best_model]
    notes = {}
    for c, value in col.items():
        loss = (best - value) if g.mode == "max" else (value - best)
        note = {"value": _plain(value), "best": _plain(best), "best_model": best_model, "loss": _plain(loss),
                "test": "estimate"}
        if g.test == "interval" and answers is not None and c != best_model and {c, best_model} <= set(answers):
            worse, better = per_item(answers[c], g.metric), per_item(answers[best_model], g.metric)
            iv = _interval(rule, paired_ratio_difference, *((better, worse) if g.mode == "max" else (worse, better)))
            note.update(test="interval", loss_low=iv["low"], loss_high=iv["high"])
            note["passed"] = bool(iv["low"] <= g.tolerance)  # NaN (nothing paired): fails
        else:
            note["passed"] = bool(loss <= g.tolerance)  # NaN fails
        notes[c] = note
    return notes


def _guard_text(metric: str, tolerance: float, note: dict) -> str:
    """One guard's verdict on one model, for decision reasons and reports."""
    if note["value"] is None or note["value"] != note["value"]:
        return f"{metric} was not measured"
    text = f"{metric} = {note['value']:.4g} vs best {note['best']:.4g} ({note['best_model']}; tolerance {tolerance:g}"
    if note["test"] == "interval":
        text += f"; loss {note['loss']:+.4f}, interval {note['loss_low']:+.4f} .. {note['loss_high']:+.4f}"
    return text + ")"


def _interval(rule: SelectionRule, fn, *tables: pd.DataFrame) -> dict:
    return fn(*tables, confidence=rule.confidence, n=rule.bootstrap_samples).as_dict()


def _difference(rule: SelectionRule, a: pd.DataFrame, b: pd.DataFrame, name_a: str, name_b: str) -> dict:
    """The margin of a over b on the primary metric (a − b for ``max``, b − a for ``min``: positive = a better)."""
    d = _interval(rule, paired_ratio_difference, a, b)
    if rule.primary.mode == "min":
        d.update(estimate=-d["estimate"], low=-d["high"], high=-d["low"])
    # ``mean`` / ``ci95`` are the names earlier decisions used (kept for readers of old decision.json files)
    return {**d, "of": name_a, "over": name_b, "mean": d["estimate"], "ci95": [d["low"], d["high"]],
            "pairs": "same questions, both models"}


def _promotion(rule: SelectionRule, rows: pd.DataFrame, passed: pd.Series, guard_notes: dict, winner: str,
               runner_up: str | None, incumbent: dict | None, against: dict | None) -> dict:
    """Who holds ``champion`` and ``challenger`` after the decision, and why."""
    if incumbent is None:
        return {"status": "first", "promoted": True, "champion": winner, "challenger": runner_up, "held_back": [],
                "explanation": f"no champion yet: {winner} is the best candidate by the rule"}
    inc = incumbent["label"]
    digests = rows["digest"] if "digest" in rows.columns else pd.Series(dtype=object)
    if incumbent.get("digest") and digests.get(winner) == incumbent["digest"]:
        return {"status": "unchanged", "promoted": False, "champion": winner, "challenger": runner_up, "held_back": [],
                "explanation": f"the best candidate {winner} is the champion itself (same model digest)"}
    reasons = []
    if not passed[winner]:
        failed = [_guard_text(g.metric, g.tolerance, note) for g in rule.guards
                  if not (note := guard_notes[g.metric][winner])["passed"]]
        reasons.append(f"guards: {winner} fails {'; '.join(failed)}")
    d = against[winner]
    if np.isnan(d["low"]):
        reasons.append(f"margin: no evaluation item was answered by both {winner} and the champion; nothing to compare")
    elif d["low"] <= rule.min_effect:
        reasons.append(f"margin: {winner} − champion on {rule.primary.metric} = {d['estimate']:+.4f}, "
                       f"{d['confidence']:.0%} interval [{d['low']:+.4f}, {d['high']:+.4f}]; its lower bound does not "
                       f"exceed min_effect {rule.min_effect:g}")
    if reasons:
        return {"status": "held_back", "promoted": False, "champion": inc, "challenger": winner, "held_back": reasons,
                "explanation": f"the champion ({inc}) stays; {winner} becomes the challenger: " + "; ".join(reasons)}
    return {"status": "promoted", "promoted": True, "champion": winner, "challenger": runner_up or inc, "held_back": [],
            "explanation": f"{winner} beats the champion ({inc}) on {rule.primary.metric} by {d['estimate']:+.4f}, "
                           f"{d['confidence']:.0%} interval [{d['low']:+.4f}, {d['high']:+.4f}] above min_effect "
                           f"{rule.min_effect:g}, and passes the guards"}


def _plain(x):
    return x.item() if isinstance(x, np.generic) else x


def per_item(answers: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Each answer's share of a summary metric as (``num``, ``den``): the metric over any set of answers is
    sum(num) / sum(den) (fact checks pool over checks, text metrics average over answers). Indexed by (video_id,
    kind, question) so two models' answers pair up. Metrics: ``<dataset>/fact_accuracy``,
    ``<dataset>/fact/<kind>``, ``<dataset>/choice_accuracy``, ``<dataset>/choice/<kind>`` (and ``wrong_video_choice``),
    ``<dataset>/<kind>/<column>``."""
    dataset, _, rest = metric.partition("/")
    keys = ["seed", "video_id", "kind", "question"] if "seed" in answers.columns else ["video_id", "kind", "question"]
    rows = answers[answers["dataset"] == dataset].set_index(keys)
    family, _, kind = rest.removesuffix("_accuracy").partition("/")
    if family in ("fact", *CHOICE_FAMILIES) and (rest.endswith("_accuracy") or kind):
        known = FACT_KINDS if family == "fact" else CHOICE_KINDS
        checked = [f"{family}_{k}" for k in known if f"{family}_{k}" in rows.columns]
        cols = [f"{family}_{kind}"] if kind else checked
        if not cols or not set(cols) <= set(checked):
            raise ValueError(f"cannot pair answers on {metric!r}: no per-answer column {(cols or [family])[0]!r}")
        checks = checks_as_float(rows[cols])
        return pd.DataFrame({"num": checks.sum(axis=1, min_count=1).fillna(0.0), "den": checks.notna().sum(axis=1)})
    kind, _, column = rest.partition("/")
    if column not in rows.columns:
        raise ValueError(f"cannot pair answers on {metric!r}: no per-answer column {column!r}")
    values = rows.loc[rows.index.get_level_values("kind") == kind, column].astype(float)
    return pd.DataFrame({"num": values.fillna(0.0), "den": values.notna().astype(float)})


def paired_difference(a: pd.DataFrame, b: pd.DataFrame, metric: str, *, n: int = 2000, seed: int = 0,
                      confidence: float = 0.95) -> tuple[float, float, float]:
    """``metric`` of model a minus model b over the questions both answered, with a bootstrap interval at
    ``confidence`` (questions resampled together for both): how sure the decision is, given the size of the
    evaluation set."""
    d = paired_ratio_difference(per_item(a, metric), per_item(b, metric), confidence=confidence, n=n, seed=seed)
    return d.estimate, d.low, d.high


def pool_seeds(config: SelectionConfig, models: list[dict], metrics: list[dict[str, float]],
               answers: list[pd.DataFrame]) -> dict:
    """Per candidate, its runs over ``config.seeds`` (inputs in ``config.runs()`` order) pooled: metrics are means
    over seeds (``<primary>/sd`` their spread), answers are stacked with a ``seed`` column (so intervals resample seeds
    and questions, crossed, and pair (seed, question) cells; ``hilight.experiments.bootstrap``), and the candidate's model is its seed with the best primary metric. Also each seed's
    winner by the rule alone. Without seeds, the inputs pass through."""
    runs = config.runs()
    if config.seeds is None:
        return {"models": models, "metrics": metrics, "answers": answers, "per_seed": None}
    p = config.rule.primary
    out = {"models": [], "metrics": [], "answers": [], "per_seed": {}}
    for name in config.candidates:
        idx = [i for i, (n, _) in enumerate(runs) if n == name]
        values = pd.Series([metrics[i].get(p.metric, np.nan) for i in idx], dtype=float)
        best = idx[int(values.idxmax() if p.mode == "max" else values.idxmin())]
        mean = pd.DataFrame([metrics[i] for i in idx]).mean(numeric_only=True).to_dict()
        out["models"].append(models[best])
        out["metrics"].append({**mean, f"{p.metric}/sd": float(values.std(ddof=1)) if len(idx) > 1 else np.nan})
        out["answers"].append(pd.concat([answers[i].assign(seed=runs[i][1]) for i in idx], ignore_index=True))
    for seed in config.seeds:
        table = pd.DataFrame([{"candidate": n, **metrics[i]} for i, (n, s) in enumerate(runs) if s == seed])
        out["per_seed"][str(seed)] = {"winner": decide(table, config.rule)["winner"],
                                      "values": dict(zip(table["candidate"], table[p.metric].astype(float), strict=True))}
    return out


# ------------------------------------------------------------------------------------------------ decision report


def render_decision(decision: dict, evidence: pd.DataFrame) -> str:
    """The decision record as Markdown: outcome and why, the rule, the evidence table with intervals (incumbent and
    candidates), and what changed in the registry (``decision["changes"]``, filled in by the promotion step)."""
    rule = decision["rule"]
    p = rule["primary"]["metric"]
    intervals = decision.get("intervals", {})
    against = decision.get("against_incumbent", {})
    inc = (decision.get("incumbent") or {}).get("label")
    lines = [f"# Selection decision: {decision['status']}", "", decision["explanation"], "",
             f"**Rule.** {decision['rule_text']}", ""]
    metric_cols = [c for c in evidence.columns if "/" in c and c != p][:6]
    head = ["model", "role", f"{p} [{rule['confidence']:.0%} CI]", "margin over champion [CI]", "guards", *metric_cols]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in evidence.to_dict("records"):
        name = row["candidate"]
        role = ("champion (incumbent)" if name == inc else
                "new champion" if name == decision["champion"] else
                "challenger" if name == decision.get("challenger") else "candidate")
        iv = intervals.get(name)
        primary = (f"{iv['estimate']:.3f} [{iv['low']:.3f}, {iv['high']:.3f}]" if iv and iv["items"]
                   else f"{row[p]:.3f}")
        d = against.get(name)
        margin = f"{d['estimate']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" if d else "—"
        guards = "pass" if row.get("passed_guards", True) else "FAIL"
        lines.append("| " + " | ".join([name, role, primary, margin, guards, *(f"{row[c]:.3f}" for c in metric_cols)])
                     + " |")
    tolerance = {g["metric"]: g["tolerance"] for g in rule["guards"]}
    guard_lines = [f"- {name}: {'pass' if note['passed'] else 'FAIL'}, {_guard_text(metric, tolerance[metric], note)}"
                   for metric, notes in decision.get("guards", {}).items() for name, note in notes.items()
                   if metric in tolerance]
    if guard_lines:
        lines += ["", "**Guards** (loss = how far below the best model; the interval is paired over questions):",
                  *guard_lines]
    diff = decision.get("primary_difference")
    if diff:
        lines += ["", f"Best new candidate {diff['of']} − runner-up {diff['over']} on {p}: {diff['estimate']:+.4f} "
                      f"[{diff['low']:+.4f}, {diff['high']:+.4f}] (paired over {diff['items']} items"
                      f"{seeds_text(diff.get('seeds', 1))})."]
    if decision.get("per_seed"):
        lines += ["", "**Per training seed** (the table shows means over seeds; the intervals resample the seeds and the "
                      "questions, crossed, and cover the Student-t interval over the seeds: with two or three seeds only a "
                      "large gap clears it; benchmarks/RESULTS.md, \"Intervals over seeds\"):",
                  *(f"- seed {seed}: winner {v['winner']}; " + ", ".join(f"{c} {x:.3f}" for c, x in v["values"].items())
                    for seed, v in decision["per_seed"].items())]
    if decision.get("changes"):
        lines += ["", "**What changed.**", *(f"- {c}" for c in decision["changes"])]
    if decision.get("held_back"):
        lines += ["", "**Held back by.**", *(f"- {r}" for r in decision["held_back"])]
    return "\n".join(lines) + "\n"


def write_decision_report(decision: dict, evidence: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
    """``decision.json``, ``decision.md`` and ``comparison.png`` (primary metric with its interval per model, and
    each candidate's margin over the champion or the runner-up with ``min_effect`` drawn) under ``out_dir``."""
    import json

    from matplotlib.figure import Figure

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "decision.json", "markdown": out_dir / "decision.md", "plot": out_dir / "comparison.png"}
    paths["json"].write_text(json.dumps(decision, indent=1, default=str))
    markdown = render_decision(decision, evidence)
    p = decision["rule"]["primary"]["metric"]
    intervals = decision.get("intervals", {})
    names = [n for n in evidence["candidate"] if n in intervals] or list(evidence["candidate"])
    margins = decision.get("against_incumbent") or (
        {decision["winner"]: decision["primary_difference"]} if decision.get("primary_difference") else {})
    fig = Figure(figsize=(4.0 + 3.6 * bool(margins), 3.4), layout="constrained")
    axes = fig.subplots(1, 1 + bool(margins), squeeze=False)[0]
    est = [intervals.get(n, {}).get("estimate", float(evidence.set_index("candidate").at[n, p])) for n in names]
    err = np.array([[e - intervals[n]["low"], intervals[n]["high"] - e] if n in intervals else [0.0, 0.0]
                    for n, e in zip(names, est, strict=True)]).T
    colours = ["C1" if n == decision["champion"] else "C0" for n in names]
    axes[0].bar(range(len(names)), est, yerr=np.nan_to_num(err), color=colours, capsize=4)
    axes[0].set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    axes[0].set_title(f"{p} ({decision['rule']['confidence']:.0%} bootstrap CI)", fontsize=9)
    if margins:
        mn = list(margins)
        m_est = [margins[n]["estimate"] for n in mn]
        m_err = np.array([[margins[n]["estimate"] - margins[n]["low"], margins[n]["high"] - margins[n]["estimate"]]
                          for n in mn]).T
        axes[1].errorbar(m_est, range(len(mn)), xerr=np.nan_to_num(m_err), fmt="o", capsize=4)
        axes[1].axvline(decision["rule"]["min_effect"], color="C3", linestyle="--", label="min_effect")
        axes[1].axvline(0, color="grey", linewidth=0.8)
        axes[1].set_yticks(range(len(mn)), [f"{n} − {margins[n]['over']}" for n in mn], fontsize=8)
        axes[1].set_title("paired margin (positive = better)", fontsize=9)
        axes[1].legend(fontsize=7)
    fig.savefig(paths["plot"], dpi=100)
    paths["markdown"].write_text(markdown + f"\n![comparison]({paths['plot'].name})\n")
    return paths
