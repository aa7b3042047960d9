"""Multiple-choice fact scoring: does the model find the true answer more likely than the same answer with the
fact changed?

A generated answer is checked only if the model phrases all of it well, and a 6-way colour question asked of a few
dozen held-out clips leaves wide intervals. Scoring the reference answer teacher-forced, once with each value of the
fact (each ball colour, each pocket, ...), asks only what the model knows about the clip: the item is right when the
true value's answer has the highest log-likelihood (strictly: a tie is wrong). This is how lm-evaluation-harness
scores multiple-choice tasks (its ``acc``: summed log-likelihood of each option's continuation); it is done here
rather than through the harness because the options share a video prefix spliced into the LLM's input, which the
harness's model API cannot take.

An item gets one choice per fact kind whose vocabulary (``CHOICES``) the reference names exactly one value of, when
that value is not already given by the question or the conversation before it (as in ``hilight.eval.facts``):
"Which pocket did the red ball go into?" is a pocket choice, not a colour one. Chance is 1 / the number of values
(``<dataset>/choice_chance``); a model that ignores the video can still beat it by knowing which values are common,
so each item is also scored with another clip's video (``wrong_video_choice_<kind>``): what a candidate gets from
the video is its choice accuracy minus that control's.
A value keeps its capital, and an indefinite article before it changes with it ("An orange circle" → "A red
circle"), so an option's grammar does not give it away. Scores are summed, not length-normalised (lm-eval's
``acc``, not ``acc_norm``): options that differ in token count ("top side pocket", "top left corner pocket") are
compared by the likelihood of the whole answer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import pandas as pd
import torch

from hilight.data.conversations import IGNORE_INDEX, Turn, encode, prompt_turns
from hilight.data.synth.billiards import BALL_COLOURS
from hilight.data.synth.general import COLOURS, DIRECTIONS
from hilight.data.synth.physics import POCKET_NAMES
from hilight.eval.facts import history_text

# dataset -> fact kind -> the values one answer could name
CHOICES: dict[str, dict[str, tuple[str, ...]]] = {
    "billiards": {"colour": tuple(BALL_COLOURS), "pocket": POCKET_NAMES},
    "general": {"colour": tuple(COLOURS), "direction": tuple(DIRECTIONS)},
}
CHOICE_KINDS = tuple(sorted({kind for kinds in CHOICES.values() for kind in kinds}))  # per-answer column suffixes


def _pattern(value: str) -> re.Pattern:
    """``value`` as a whole word or phrase, with the indefinite article before it if any."""
    return re.compile(rf"(?<![\w-])(?:(an?) +)?({re.escape(value)})(?![\w-])", re.IGNORECASE)


def _substitute(pattern: re.Pattern, value: str, text: str) -> str:
    """Every mention of ``pattern``'s value in ``text`` replaced by ``value``, keeping a capital and choosing the
    article ("An orange circle" -> "A red circle"), so no option is given away by its grammar."""

    def one(m: re.Match) -> str:
        new = value[0].upper() + value[1:] if m.group(2)[0].isupper() else value
        if m.group(1) is None:
            return new
        article = "an" if value[0].lower() in "aeiou" else "a"
        return (article.capitalize() if m.group(1)[0].isupper() else article) + " " + new

    return pattern.sub(one, text)


def choice_options(dataset: str, question: str, reference: str, history: str = "") -> dict[str, tuple[int, list[str]]]:
    """Per fact kind the reference can be varied on: (index of the true value, the reference with each value)."""
    given = f"{history} {question}"
    out = {}
    for kind, values in CHOICES.get(dataset, {}).items():
        named = [i for i, v in enumerate(values) if _pattern(v).search(reference)]
        if len(named) != 1 or _pattern(values[named[0]]).search(given):
            continue
        truth = _pattern(values[named[0]])
        out[kind] = (named[0], [_substitute(truth, v, reference) for v in values])
    return out


@dataclass(frozen=True)
class ChoiceRequest:
    """One item's options to score: the answers to ``question`` (after ``history``) about one video."""

    video_tokens: torch.Tensor  # [N, D] TokenMining tokens
    question: str
    answers: list[str]
    history: tuple[Turn, ...] = ()


def _option_rows(tokenizer, request: ChoiceRequest) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels on the answer only) per option, prompted exactly as generation is."""
    n = request.video_tokens.shape[0]
    turns = prompt_turns(request.question, list(request.history))
    prompt = encode(turns, tokenizer, video_tokens=n).input_ids
    rows = []
    for a in request.answers:
        enc = encode([*turns[:-1], Turn(turns[-1].question, a)], tokenizer, video_tokens=n)
        if enc.input_ids[:len(prompt)] != prompt:
            raise RuntimeError("the scored answer's prompt differs from the generation prompt; the chat template "
                               "must render a question the same with or without its answer")
        rows.append((enc.input_ids, [IGNORE_INDEX] * len(prompt) + enc.labels[len(prompt):]))
    return rows


@torch.no_grad()
def _rows_logprobs(vlm, pad_token_id: int, rows: list[tuple[list[int], list[int]]],
                   videos: torch.Tensor) -> torch.Tensor:
    """Summed log-likelihood of each row's labelled tokens, row ``i`` shown ``videos[i]``; right-padded. ``[R]``."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    device = videos.device
    s = vlm.splice(ids.to(device), mask.to(device), videos, labels.to(device))
    logits = vlm.llm(inputs_embeds=s.inputs_embeds, attention_mask=s.attention_mask,
                     position_ids=s.position_ids).logits[:, :-1]
    target = s.labels[:, 1:]
    scored = target != IGNORE_INDEX  # the answer tokens only: a log-softmax over the vocabulary at these alone
    logp = logits[scored].float().log_softmax(-1).gather(-1, target[scored][:, None])[:, 0]
    return torch.zeros(len(rows), device=logp.device).index_add_(0, scored.nonzero()[:, 0], logp).cpu()


def batched_logprobs(vlm, tokenizer, requests: list[ChoiceRequest], *, batch_rows: int = 64) -> list[torch.Tensor]:
    """``answer_logprobs`` of many requests, their options packed into forward passes of about ``batch_rows``
    sequences (one request's options never split). One pass per item left the CPU demo's evaluation spending most
    of its time on 6-row batches."""
    out: list[torch.Tensor] = []
    i = 0
    while i < len(requests):
        chunk, n_rows = [], 0
        while i < len(requests) and (not chunk or n_rows + len(requests[i].answers) <= batch_rows):
            chunk.append(requests[i])
            n_rows += len(requests[i].answers)
            i += 1
        rows = [row for r in chunk for row in _option_rows(tokenizer, r)]
        videos = torch.cat([r.video_tokens[None].expand(len(r.answers), -1, -1) for r in chunk])
        ll = _rows_logprobs(vlm, tokenizer.pad_token_id, rows, videos)
        out += list(ll.split([len(r.answers) for r in chunk]))
    return out


def answer_logprobs(vlm, tokenizer, video_tokens: torch.Tensor, question: str, answers: list[str],
                    history: list[Turn] = ()) -> torch.Tensor:
    """Summed log-likelihood of each of ``answers`` to ``question`` (after ``history``) about one video
    (``video_tokens [N, D]``), prompted exactly as generation is. ``[len(answers)]``."""
    return batched_logprobs(vlm, tokenizer, [ChoiceRequest(video_tokens, question, list(answers), tuple(history))])[0]


def wrong_videos(items: pd.DataFrame) -> dict[str, str]:
    """Each video of ``items`` → another video of its dataset (the next by id, the last to the first): the control
    that shows how much of a choice score comes from the video. A dataset with one video gets none."""
    out = {}
    for _, ids in items.groupby("dataset")["video_id"]:
        ids = sorted(set(ids))
        if len(ids) > 1:
            out.update(zip(ids, ids[1:] + ids[:1]))
    return out


def score_choices(vlm, tokenizer, items: pd.DataFrame, tokens: dict[str, torch.Tensor], *,
                  prefix: str = "choice", video_of: dict[str, str] | None = None, batch_rows: int = 64) -> pd.DataFrame:
    """``<prefix>_<kind>`` (True/False/NA) and ``<prefix>_<kind>_options`` per item of ``items`` (dataset, video_id,
    question, reference, history), from each video's TokenMining tokens. ``video_of`` shows each item another
    video instead (``wrong_videos``; an item whose video has none is NA). ``batch_rows``: options scored per
    forward pass (their logits are rows x length x vocabulary: mind a 256k vocabulary)."""
    out = {f"{prefix}_{k}": [pd.NA] * len(items) for k in CHOICE_KINDS}
    out.update({f"{prefix}_{k}_options": [0] * len(items) for k in CHOICE_KINDS})
    todo, requests = [], []  # (row, kind, index of the true option), and what to score for it
    for row, it in enumerate(items.itertuples(index=False)):
        shown = it.video_id if video_of is None else video_of.get(it.video_id)
        if shown is None:
            continue
        history = tuple(Turn(q, a) for q, a in json.loads(it.history))
        for kind, (truth, options) in choice_options(it.dataset, it.question, it.reference,
                                                     history_text(it.history)).items():
            todo.append((row, kind, truth))
            requests.append(ChoiceRequest(tokens[shown], it.question, options, history))
    for (row, kind, truth), ll in zip(todo, batched_logprobs(vlm, tokenizer, requests, batch_rows=batch_rows),
                                      strict=True):
        others = torch.cat([ll[:truth], ll[truth + 1:]])
        out[f"{prefix}_{kind}"][row] = bool(ll[truth] > others.max())  # a tie is wrong
        out[f"{prefix}_{kind}_options"][row] = len(ll)
    frame = pd.DataFrame(out, index=items.index)
    return frame.astype({f"{prefix}_{k}": "boolean" for k in CHOICE_KINDS})
