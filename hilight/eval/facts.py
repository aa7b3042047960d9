"""Factual checks of generated answers against the synthetic datasets' event metadata (``events.json``).

The synthetic generator knows what happened in every clip (which ball the cue ball hit first, which balls were
pocketed and where, whether the rack was broken; for the general domain each shape's colour and direction), so an
answer can be checked fact by fact instead of only by word overlap. A check is ``True``/``False`` when the answer
is about that fact and ``None`` when the fact does not apply (e.g. "pocket" for a clip where nothing was pocketed
and the question is about the first contact). Real datasets have no event log; their answers get text metrics and
the CLIP-ViP similarity only.

Rules (``answer`` lower-cased, whole-word matches):
- billiards colour: the answer names the key ball's colour and no other object-ball colour in its place — the key
  ball is the one the question asks about (first contact, pocketed ball: the colour before "ball rolled into",
  "was pocketed", ... when the answer has one), or for a description the first contact (the first pocketed ball on
  a break);
- billiards pocket: a pocketed ball → its pocket named and no other pocket; nothing pocketed → no pocket named;
- billiards action: the kinds of shot the answer claims (break: "scattered"; pot: "knocked into", "pocketed"; miss:
  "misses", "no ball") must be the clip's: a break claimed with its pots (or none), a pot or a miss and not the
  other; for "was any ball pocketed?" the yes/no;
- counts: the number (word or digit) of pocketed balls / moving shapes;
- general colour / direction: each shape asked about (or every shape, for a description) with its colour /
  direction named.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from hilight.data.synth.billiards import BALL_COLOURS, CUE
from hilight.data.synth.general import COLOURS, SHORT_DIRECTION
from hilight.data.synth.physics import POCKET_NAMES

FACT_KINDS = ("colour", "pocket", "action", "count", "direction")
NUMBER_WORDS = {0: ("no", "zero", "0"), 1: ("one", "a single", "1"), 2: ("two", "2"), 3: ("three", "3"),
                4: ("four", "4"), 5: ("five", "5"), 6: ("six", "6")}


def _shots(answer: str) -> set[str]:
    """The kinds of shot an answer claims: break, pot (an object ball went in), miss."""
    claims = set()
    if any(_has(answer, w) for w in ("scatter", "scatters", "scattered", "break", "breaks", "broken")):
        claims.add("break")
    no_pot = _has(answer, "no ball") or _has(answer, "no balls")
    if no_pot or any(_has(answer, w) for w in ("miss", "misses", "missed")):
        claims.add("miss")
    if any(_has(answer, w) for w in ("knocked into", "went into", "goes into")) or (_has(answer, "pocketed") and not no_pot):
        claims.add("pot")
    return claims


def _has(text: str, phrase: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(phrase)}(?![\w-])", text) is not None


def _named(text: str, vocab) -> set[str]:
    return {v for v in vocab if _has(text, v)}


@dataclass
class ClipFacts:
    """What happened in one synthetic clip."""

    domain: str
    first_contact: str | None = None
    pocketed: list[tuple[str, str]] = field(default_factory=list)  # object balls (colour, pocket), in order
    scenario: str | None = None
    movers: list[dict] = field(default_factory=list)  # general: shape, colour, direction


def read_events(path: str | Path, dataset: str) -> dict[str, ClipFacts]:
    """``events.json`` of a synthetic dataset → facts per manifest video id (``<dataset>/<video_id>``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"event metadata {path} does not exist; list a synthetic dataset's events.json under "
                                "evaluation.events, or leave that dataset out")
    out = {}
    for rec in json.loads(path.read_text()):
        vid = f"{dataset}/{rec['video_id']}"
        if "movers" in rec:
            out[vid] = ClipFacts("general", movers=rec["movers"])
        else:
            pocketed = [(p["ball"], p["pocket"]) for p in rec["pocketed"] if p["ball"] != CUE]
            out[vid] = ClipFacts("billiards", rec.get("first_contact"), pocketed, rec["scenario"])
    return out


def _count_ok(answer: str, n: int) -> bool:
    said = {k for k, words in NUMBER_WORDS.items() if any(_has(answer, w) for w in words)}
    return n in said and len(said - {n}) == 0


def _colour_ok(answer: str, key: str) -> bool:
    return _has(answer, key) and not (_named(answer, BALL_COLOURS) - {key})


_POCKETED = re.compile(rf"(?<![\w-])({'|'.join(BALL_COLOURS)}) ball (?:rolled into|was pocketed|went into|"
                       r"is knocked into|was knocked into|fell into)")


def _pocketed_colour_ok(answer: str, key: str) -> bool:
    """The ball the answer says went in is ``key``, and no other: "The white cue ball hit the red ball, and the blue
    ball rolled into the pocket" names red (the first contact) and blue (the ball asked about). An answer that says
    nothing went in is held to :func:`_colour_ok`."""
    said = set(_POCKETED.findall(answer))
    return said == {key} if said else _colour_ok(answer, key)


def _billiards(facts: ClipFacts, question: str, answer: str) -> dict[str, bool | None]:
    q = question.lower()
    pots = facts.pocketed
    if "hit first" in q:
        return {"colour": _colour_ok(answer, facts.first_contact)} if facts.first_contact else {}
    if "color ball was pocketed" in q or "colour ball was pocketed" in q:
        return {"colour": _pocketed_colour_ok(answer, pots[0][0])} if pots else {}
    m = re.search(r"which pocket did the (\w+) ball", q)
    if m:
        want = dict(pots).get(m.group(1))
        return {"pocket": _named(answer, POCKET_NAMES) == {want}} if want else {}
    if "any ball pocketed" in q:
        return {"action": answer.startswith("yes") if pots else answer.startswith("no")}
    if "how many" in q:
        return {"count": _count_ok(answer, len(pots))}
    # a description: the key ball, the pockets, the kind of shot
    checks: dict[str, bool | None] = {}
    key = facts.first_contact if facts.scenario != "break" else (pots[0][0] if pots else None)
    if key:
        checks["colour"] = _has(answer, key)
    named_pockets = _named(answer, POCKET_NAMES)
    checks["pocket"] = named_pockets == {pots[0][1]} if pots else not named_pockets
    claims = _shots(answer)
    if facts.scenario == "break":
        checks["action"] = "break" in claims and ("pot" in claims) == bool(pots)
    else:
        kind = "pot" if pots else "miss"
        checks["action"] = kind in claims and not claims & ({"pot", "miss"} - {kind})
    return checks


def _general(facts: ClipFacts, question: str, answer: str) -> dict[str, bool | None]:
    q = question.lower()
    movers = facts.movers

    def direction_ok(m: dict) -> bool:
        return _has(answer, m["direction"]) or _has(answer, SHORT_DIRECTION[m["direction"]])

    m = re.search(r"what colou?r is the (\w+)", q)
    if m:
        about = [x for x in movers if x["shape"] == m.group(1)]
        return {"colour": _named(answer, COLOURS) == {about[0]["colour"]}} if about else {}
    m = re.search(r"which way does the (\w+) (\w+) move", q)
    if m:
        about = [x for x in movers if x["colour"] == m.group(1) and x["shape"] == m.group(2)]
        return {"direction": direction_ok(about[0])} if about else {}
    if "how many" in q:
        return {"count": _count_ok(answer, len(movers))}
    return {"colour": all(_has(answer, x["colour"]) for x in movers),
            "direction": all(direction_ok(x) for x in movers)}


def _checks(facts: ClipFacts, question: str, text: str) -> dict[str, bool | None]:
    text = text.lower().strip()
    return _billiards(facts, question, text) if facts.domain == "billiards" else _general(facts, question, text)


def history_text(history: str) -> str:
    """The earlier turns of an item's ``history`` (JSON [[question, answer], ...]) as one text."""
    return " ".join(f"{q} {a}" for q, a in json.loads(history))


def check_answer(facts: ClipFacts, question: str, answer: str, history: str = "") -> dict[str, bool | None]:
    """Fact checks of one answer (see the module docstring); only the kinds that apply are returned.

    ``history`` is the conversation before the question (earlier questions and answers, as text). A fact that the
    history alone already states is not evidence that the model saw it in the video, so that check is left out: in
    the synthetic QA, "Which ball did the white cue ball hit first?" follows "What color ball was pocketed…? The red
    ball was pocketed." and "Which pocket did the red ball go into?" on a pot, and would otherwise score every model
    right on every pot, video or not.
    """
    checks = _checks(facts, question, answer)
    if history.strip():
        given = _checks(facts, question, history)
        checks = {k: v for k, v in checks.items() if given.get(k) is not True}
    return {k: v for k, v in checks.items() if v is not None}
