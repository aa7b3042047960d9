"""Caption, hard-negative and QA structures shared by the synthetic domains.

A caption carries the facts it states (``Fact``: kind, true value, plausible wrong values). A hard
negative is the same sentence with exactly one fact swapped for a wrong value, so an evaluation
can tell *which* kind of detail (colour, pocket, action, ...) a model fails to see.

A caption may also have a ``short`` form that states fewer of its facts, all true. Paired with a longer hard
negative it makes the "say more, wrong more" probe of the research notes (§1.5): the short true sentence should
outscore the longer sentence with one wrong fact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

VIDEO_TOKEN = "<video>"


@dataclass
class Fact:
    kind: str  # "colour" | "pocket" | "action" | "region" | "shape" | "direction" | ...
    value: str
    alternatives: list[str] = field(default_factory=list)


@dataclass
class Caption:
    text: str
    object: str  # what the caption is about: "cue ball", "red ball", "background", ...
    facts: list[Fact] = field(default_factory=list)
    short: str | None = None  # fewer facts, all true (None: the caption has no shorter true form)


@dataclass
class QAPair:
    question: str
    answer: str
    kind: str  # what is asked: "pocketed_colour", "pocket", "first_contact", ...
    answer_value: str  # the checkable fact the answer states


def _pattern(value: str) -> re.Pattern:
    return re.compile(rf"(?<![\w-]){re.escape(value)}(?![\w-])")


def hard_negatives(caption: Caption, rng: np.random.Generator) -> list[dict]:
    """One negative per fact that occurs exactly once in the caption: that fact swapped, nothing else."""
    out = []
    for fact in caption.facts:
        if not fact.alternatives or len(_pattern(fact.value).findall(caption.text)) != 1:
            continue
        wrong = fact.alternatives[int(rng.integers(len(fact.alternatives)))]
        negative = _pattern(fact.value).sub(wrong, caption.text, count=1)
        out.append({"negative": negative, "changed": fact.kind, "from": fact.value, "to": wrong})
    return out


def probe_pairs(caption: Caption, negatives: list[dict]) -> list[dict]:
    """(short, all true) vs (longer, one fact wrong) pairs: the caption's short form against each of its hard
    negatives that has more words."""
    if caption.short is None:
        return []
    words = len(caption.short.split())
    return [{"short": caption.short, "long": n["negative"], "changed": n["changed"]}
            for n in negatives if len(n["negative"].split()) > words]


def conversation(qa: list[QAPair], rng: np.random.Generator) -> list[dict]:
    """LLaVA/VideoInstruct turns; the ``<video>`` marker goes before or after the first question."""
    turns = []
    for i, pair in enumerate(qa):
        question = pair.question
        if i == 0:
            question = f"{VIDEO_TOKEN}\n{question}" if rng.random() < 0.5 else f"{question}\n{VIDEO_TOKEN}"
        turns.append({"from": "human", "value": question})
        turns.append({"from": "gpt", "value": pair.answer})
    return turns
