"""Caption-score evaluation of a HiLight model (research notes §6–§7, made systematic).

For each held-out video of each evaluated dataset the model is asked the fixed description prompt (the notes'
"What's happened in this video?") and, with ``questions``, each held-out QA question about that video, one
question per prompt. Decoding comes from the config (the notes: temperature 0.1, 128 new tokens), seeded, so
every candidate is asked the same way. Each answer gets:

- text overlap with the reference (the video's captions as sentences, or the QA answer): sentence BLEU and chrF
  from sacrebleu, ROUGE-L F1 from rouge-score;
- the aligned CLIP-ViP's cosine similarity between the video and the answer (one fixed judge for every
  candidate; the reference text's similarity is kept beside it as the ceiling);
- factual checks against the synthetic event metadata (``hilight.eval.facts``): colour, pocket, action, count,
  direction;
- with ``choices``, the facts its reference states scored as multiple choices (``hilight.eval.choice``): is the
  reference more likely, teacher-forced, than the same answer with another colour, pocket or direction? And the
  same with another clip's video shown (``wrong_video_baseline``), the control for what the video contributes.

``evaluate_vlm`` returns the per-answer table and summary metrics named ``<dataset>/fact_accuracy``,
``<dataset>/fact/<kind>``, ``<dataset>/choice_accuracy`` (with ``<dataset>/choice_chance``, its chance level),
``<dataset>/choice/<kind>`` (with ``<dataset>/wrong_video_choice_accuracy`` and ``<dataset>/wrong_video_choice/<kind>``,
the same shown another clip's video) and ``<dataset>/<describe|qa>/<bleu|chrf|rougeL|clip_similarity>``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import sacrebleu
import torch
from pydantic import BaseModel, ConfigDict, Field
from rouge_score import rouge_scorer

from hilight.data.captions import read_caption_manifest
from hilight.data.conversations import Turn, parse_conversation, strip_video
from hilight.data.frames import load_clip_frames
from hilight.data.probe import sha256_file
from hilight.data.qa import DESCRIBE_PROMPT, describe_rows, read_qa_manifest
from hilight.env import resolve_path
from hilight.eval.choice import CHOICE_KINDS, score_choices, wrong_videos
from hilight.eval.facts import FACT_KINDS, check_answer, history_text, read_events
from hilight.models.checkpoints import load_saved_clipvip
from hilight.models.export import GenerationSpec, VLMBundle, default_device
from hilight.models.tokenizers import load_clip_tokenizer

log = logging.getLogger(__name__)

TEXT_METRICS = ("bleu", "chrf", "rougeL")
# bump when evaluate_vlm computes something new or differently: cached evaluations (the incumbent's too) are redone
EVAL_VERSION = "3"  # 2: multiple-choice fact scores; 3: their wrong-video control
CHOICE_FAMILIES = ("choice", "wrong_video_choice")  # per-answer column prefixes of hilight.eval.choice


class VLMEvalSpec(BaseModel):
    """The ``evaluation:`` block of a selection config."""

    model_config = ConfigDict(extra="forbid")

    manifest_dir: str = "outputs/data_validation"
    datasets: list[str] | None = None  # None = every dataset with captions
    splits: list[str] = ["val", "test"]
    prompt: str = DESCRIBE_PROMPT
    questions: bool = True  # also ask each held-out QA question
    choices: bool = True  # also score each stated fact as a multiple choice (hilight.eval.choice)
    wrong_video_baseline: bool = True  # with choices: score them again shown another clip's video (the control)
    max_videos: int | None = Field(64, ge=1)  # per dataset (a fixed random subset)
    events: dict[str, str] = {}  # dataset -> events.json of a synthetic dataset (factual checks)
    # datasets whose captions of a clip paraphrase one another (MSR-VTT: ~20 per clip): a description is scored
    # against each caption (multi-reference BLEU and chrF, the best ROUGE-L) instead of against all of them joined,
    # which rewards length (a perfect single caption: ROUGE-L 0.175 against MSR-VTT's joined 104 words). Captions
    # that each describe another object (table1k) stay joined: a description should cover them all
    paraphrase_datasets: list[str] = []
    judge: str | None = None  # an aligned CLIP-ViP export dir (with tokenizer/) scoring video-answer similarity
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    batch_size: int = Field(16, ge=1)  # generation's batch, and the multiple-choice options per forward pass
    seed: int = 0


@dataclass
class VLMEvaluation:
    answers: pd.DataFrame  # one row per (video, question): answer, reference, scores, fact checks, choices
    metrics: dict[str, float]

    def loggable_answers(self) -> pd.DataFrame:
        """``answers`` with its True/False/NA columns as objects, which ``mlflow.log_table`` can write."""
        return self.answers.astype({c: "object" for c, t in self.answers.dtypes.items() if str(t) == "boolean"})


def eval_items(spec: VLMEvalSpec) -> pd.DataFrame:
    """dataset, video_id, video_file, video_sha256, kind (describe|qa), question, reference, history (JSON list of
    the earlier [question, reference answer] turns of a QA conversation)."""
    captions = read_caption_manifest(spec.manifest_dir).select(spec.datasets, spec.splits)
    videos = captions.drop_duplicates("video_id")
    if spec.max_videos:
        videos = pd.concat([g.sample(min(len(g), spec.max_videos), random_state=spec.seed)
                            for _, g in videos.groupby("dataset")])
    captions = captions[captions["video_id"].isin(set(videos["video_id"]))]
    items = []
    each = captions.groupby("video_id", sort=False)["caption"].agg(list)
    for row in describe_rows(captions, spec.prompt).itertuples(index=False):
        turn = parse_conversation(row.conversations)[0]
        video_id = row.id.removeprefix("describe:")
        refs = [c.strip() for c in each[video_id]] if row.dataset in spec.paraphrase_datasets else [turn.answer]
        items.append({"dataset": row.dataset, "video_id": video_id, "video_file": row.video_file,
                      "video_sha256": row.video_sha256, "kind": "describe", "question": spec.prompt,
                      "reference": turn.answer, "references": json.dumps(refs), "history": "[]"})
    if spec.questions:
        video_of = dict(zip(zip(videos["dataset"], videos["video_sha256"]), videos["video_id"]))
        qa = read_qa_manifest(spec.manifest_dir).rows
        qa = qa.assign(video_id=[video_of.get(k) for k in zip(qa["dataset"], qa["video_sha256"])]).dropna(subset="video_id")
        for row in qa.itertuples(index=False):
            turns = strip_video(parse_conversation(row.conversations))
            for i, turn in enumerate(turns):  # follow-ups are asked after the reference answers of earlier turns
                items.append({"dataset": row.dataset, "video_id": row.video_id, "video_file": row.video_file,
                              "video_sha256": row.video_sha256, "kind": "qa", "question": turn.question.strip(),
                              "reference": turn.answer, "references": json.dumps([turn.answer]),
                              "history": json.dumps([[t.question.strip(), t.answer] for t in turns[:i]])})
    return pd.DataFrame(items)


def eval_fingerprints(spec: VLMEvalSpec) -> dict[str, str]:
    """Hashes of what evaluation reads besides the model (manifest, event files, judge weights) and the version of
    what it computes: they key cached evaluations."""
    out = {"evaluation": EVAL_VERSION, "data_fingerprint": read_caption_manifest(spec.manifest_dir).fingerprint}
    out.update({f"events:{d}": sha256_file(resolve_path(p)) for d, p in spec.events.items()})
    if spec.judge:
        out["judge"] = sha256_file(resolve_path(spec.judge) / "model.safetensors")
    return out


def text_scores(answers: list[str], references: list[list[str]]) -> pd.DataFrame:
    """BLEU and chrF against all of each answer's references (sacrebleu's multi-reference scores), ROUGE-L the best
    over them (rouge-score takes one reference); one reference each gives the single-reference scores."""
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rows = []
    for hyp, refs in zip(answers, references, strict=True):
        rows.append({"bleu": sacrebleu.sentence_bleu(hyp, refs).score / 100,
                     "chrf": sacrebleu.sentence_chrf(hyp, refs).score / 100,
                     "rougeL": max(scorer.score(ref, hyp)["rougeL"].fmeasure for ref in refs)})
    return pd.DataFrame(rows, columns=list(TEXT_METRICS))


@torch.no_grad()
def judge_similarity(judge_dir: str | Path, items: pd.DataFrame, batch_size: int) -> pd.DataFrame:
    """Cosine similarity of each video with its answer and with its reference under the aligned CLIP-ViP."""
    judge_dir = resolve_path(judge_dir)
    device = default_device()
    judge = load_saved_clipvip(judge_dir).eval().to(device)
    tok = load_clip_tokenizer(judge_dir / "tokenizer", judge.config.text.max_position_embeddings)
    cfg = judge.config
    files = items.drop_duplicates("video_id")[["video_id", "video_file"]]
    video = {}
    for start in range(0, len(files), batch_size):
        chunk = files.iloc[start:start + batch_size]
        pix = torch.stack([load_clip_frames(f, cfg.num_frames, cfg.vision.image_size) for f in chunk["video_file"]])
        emb = judge.video_embeds(judge.encode_video(pix.to(device))).float().cpu()
        video.update(zip(chunk["video_id"], emb, strict=True))

    def embed(texts: list[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), batch_size):
            enc = tok([t or " " for t in texts[start:start + batch_size]], padding=True, truncation=True,
                      return_tensors="pt").to(device)
            out.append(judge.text_embeds(judge.encode_text(enc["input_ids"], enc["attention_mask"])).float().cpu())
        return torch.cat(out)

    v = torch.stack([video[x] for x in items["video_id"]])
    return pd.DataFrame({"clip_similarity": (v * embed(items["answer"].tolist())).sum(-1).numpy(),
                         "clip_similarity_reference": (v * embed(items["reference"].tolist())).sum(-1).numpy()})


@torch.no_grad()
def video_tokens_of(bundle: VLMBundle, items: pd.DataFrame, batch_size: int) -> dict[str, torch.Tensor]:
    """Each video's TokenMining tokens, computed once per video."""
    vlm, tokens = bundle.vlm, {}
    files = items.drop_duplicates("video_id")[["video_id", "video_file"]]
    for start in range(0, len(files), batch_size):
        chunk = files.iloc[start:start + batch_size]
        pix = torch.stack([bundle.clip(f) for f in chunk["video_file"]]).to(next(vlm.token_mining.parameters()).device)
        tokens.update(zip(chunk["video_id"], vlm.token_mining(*vlm.tower_features(pix)), strict=True))
    return tokens


def generate_answers(bundle: VLMBundle, items: pd.DataFrame, spec: VLMEvalSpec,
                     tokens: dict[str, torch.Tensor]) -> list[str]:
    """Answers in ``items`` order."""
    answers = []
    for start in range(0, len(items), spec.batch_size):
        chunk = items.iloc[start:start + spec.batch_size]
        histories = [[Turn(q, a) for q, a in json.loads(h)] for h in chunk["history"]]
        answers += bundle.generate(chunk["question"].tolist(), video_tokens=torch.stack([tokens[v] for v in chunk["video_id"]]),
                                   generation=spec.generation, histories=histories)
    return answers


def checks_as_float(checks: pd.DataFrame) -> pd.DataFrame:
    """True/False/NA check columns (nullable booleans, or objects holding ``pd.NA``/None as MLflow tables and
    loggable_answers have them) as 1.0/0.0/NaN."""
    return checks.astype("boolean").astype(float)


def summarise(answers: pd.DataFrame) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for dataset, g in answers.groupby("dataset"):
        for family in CHOICE_FAMILIES:
            chosen = [f"{family}_{k}" for k in CHOICE_KINDS if f"{family}_{k}" in g and g[f"{family}_{k}"].notna().any()]
            if not chosen:
                continue
            right = checks_as_float(g[chosen]).stack()  # one value per (item, kind) choice made
            metrics[f"{dataset}/{family}_accuracy"] = float(right.mean())
            if family == "choice":
                options = g[[f"{c}_options" for c in chosen]].set_axis(chosen, axis=1).where(g[chosen].notna()).stack()
                metrics[f"{dataset}/choice_chance"] = float((1.0 / options).mean())
            for c in chosen:
                metrics[f"{dataset}/{family}/{c.removeprefix(family + '_')}"] = float(
                    checks_as_float(g[[c]]).stack().mean())
        facts = checks_as_float(g[[f"fact_{k}" for k in FACT_KINDS if f"fact_{k}" in g]])
        if facts.notna().to_numpy().any():
            metrics[f"{dataset}/fact_accuracy"] = float(facts.stack().mean())
            for k in FACT_KINDS:
                col = facts[f"fact_{k}"].dropna() if f"fact_{k}" in facts else ()
                if len(col):
                    metrics[f"{dataset}/fact/{k}"] = float(col.mean())
        for kind, h in g.groupby("kind"):
            for m in (*TEXT_METRICS, "clip_similarity", "clip_similarity_reference"):
                if m in h and h[m].notna().any():
                    metrics[f"{dataset}/{kind}/{m}"] = float(h[m].mean())
            metrics[f"{dataset}/{kind}/answers"] = float(len(h))
            metrics[f"{dataset}/{kind}/empty_answers"] = float((h["answer"].str.strip() == "").sum())
    return metrics


def metric_problem(metric: str, spec: VLMEvalSpec) -> str | None:
    """Why ``spec`` cannot measure ``metric`` (``summarise``'s names), or None when it can: checked when a config is
    read, so a typo or a metric the evaluation block does not produce fails before any candidate trains."""
    dataset, _, rest = metric.partition("/")
    if not rest:
        return f"{metric!r} has no dataset part; metrics read <dataset>/<name>, e.g. {dataset or 'table1k'}/fact_accuracy"
    if spec.datasets is not None and dataset not in spec.datasets:
        return f"{metric!r}: dataset {dataset!r} is not evaluated (evaluation.datasets: {spec.datasets})"
    family, _, kind = rest.partition("/")
    family = family.removesuffix("_accuracy") if not kind else family
    if family in ("fact", *CHOICE_FAMILIES) or rest == "choice_chance":
        if dataset not in spec.events:
            return (f"{metric!r} needs the event log of {dataset!r} (evaluation.events has "
                    f"{sorted(spec.events) or 'none'}): factual checks exist for synthetic datasets only")
        if family != "fact" and not spec.choices:
            return f"{metric!r} needs evaluation.choices: true"
        if family == "wrong_video_choice" and not spec.wrong_video_baseline:
            return f"{metric!r} needs evaluation.wrong_video_baseline: true"
        known = FACT_KINDS if family == "fact" else CHOICE_KINDS
        if kind and kind not in known:
            return f"{metric!r}: no {family} kind {kind!r}; known: {', '.join(known)}"
        if not kind and not rest.endswith(("_accuracy", "_chance")):
            return f"{metric!r}: say {dataset}/{family}_accuracy or {dataset}/{family}/<kind>"
        return None
    names = (*TEXT_METRICS, "clip_similarity", "clip_similarity_reference", "answers", "empty_answers")
    if family not in ("describe", "qa") or kind not in names:
        return (f"{metric!r} is not a metric the evaluation writes: <dataset>/<describe|qa>/<{'|'.join(names)}>, "
                f"<dataset>/fact_accuracy, <dataset>/fact/<kind>, <dataset>/choice_accuracy, <dataset>/choice/<kind>")
    if family == "qa" and not spec.questions:
        return f"{metric!r} needs evaluation.questions: true"
    if kind.startswith("clip_similarity") and not spec.judge:
        return f"{metric!r} needs evaluation.judge (an aligned CLIP-ViP export scoring video-answer similarity)"
    return None


def evaluate_vlm(bundle: VLMBundle, spec: VLMEvalSpec) -> VLMEvaluation:
    items = eval_items(spec)
    bundle.vlm.eval()
    log.info("evaluating on %d questions about %d held-out videos", len(items), items["video_id"].nunique())
    tokens = video_tokens_of(bundle, items, spec.batch_size)
    items["answer"] = generate_answers(bundle, items, spec, tokens)
    if spec.choices:
        rows = {"batch_rows": spec.batch_size}  # option sequences per forward pass, as generation's batch
        items = pd.concat([items, score_choices(bundle.vlm, bundle.tokenizer, items, tokens, **rows)], axis=1)
        if spec.wrong_video_baseline:
            items = pd.concat([items, score_choices(bundle.vlm, bundle.tokenizer, items, tokens, **rows,
                                                    prefix="wrong_video_choice", video_of=wrong_videos(items))], axis=1)
    items = pd.concat([items, text_scores(items["answer"].tolist(), [json.loads(r) for r in items["references"]])],
                      axis=1)
    if spec.judge:
        items = pd.concat([items, judge_similarity(spec.judge, items, spec.batch_size)], axis=1)
    facts = {}
    for dataset, path in spec.events.items():
        facts.update(read_events(resolve_path(path), dataset))
    checks = [check_answer(facts[v], q, a, history_text(h)) if v in facts else {}
              for v, q, a, h in zip(items["video_id"], items["question"], items["answer"], items["history"], strict=True)]
    for k in FACT_KINDS:
        items[f"fact_{k}"] = pd.array([c.get(k) for c in checks], dtype="boolean")
    metrics = summarise(items)
    return VLMEvaluation(items.drop(columns=["video_file"]), metrics)

