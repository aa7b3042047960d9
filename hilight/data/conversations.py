"""The reference's Gemma chat template (hilight-reference §3), one implementation for training and inference.

A conversation of turns (question, answer) renders as::

    <bos><start_of_turn>user\\n<video>\\n{Q1}<end_of_turn>\\n<start_of_turn>model\\n{A1}<end_of_turn>\\n<eos>
    <start_of_turn>user\\n{Q2}<end_of_turn>\\n<start_of_turn>model\\n{A2}<end_of_turn>\\n<eos>

(no line break between turns). The turn holding ``<video>`` is rebuilt as ``"<video>\\n" + question``, as the
reference's ``preprocess_multimodal`` does. Labels supervise only each answer + ``<end_of_turn>\\n<eos>``. A prompt
for generation is the same rendering with the last answer left open (``...<start_of_turn>model\\n``), produced by
the same function, so training and serving cannot drift apart.

Tokenisation is per segment: the text between markers is tokenised without special tokens, ``<video>`` becomes
``VIDEO_TOKEN_INDEX`` and ``<bos>``/``<eos>`` are inserted by id. The labels then follow from the segment
boundaries, instead of the reference's re-tokenise-and-count, which masked whole samples on any mismatch.

Truncation is explicit and counts the sequence the LLM sees, each ``<video>`` taking ``video_tokens`` positions:
whole turns are dropped from the end first; when the first turn alone is too long its answer is cut (at least one
answer token stays); when even the prompt does not fit, the sample is rejected with a ``ConversationError``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

VIDEO_TOKEN = "<video>"
VIDEO_TOKEN_INDEX = -200  # the placeholder id of the reference (hilight/constants.py)
IGNORE_INDEX = -100
USER, MODEL = "<start_of_turn>user\n", "<start_of_turn>model\n"
END = "<end_of_turn>\n"
ROLES = {"human": "user", "gpt": "model"}


class ConversationError(ValueError):
    """A conversation cannot be rendered: bad roles, order, or too long for ``max_length``."""


@dataclass(frozen=True)
class Turn:
    question: str
    answer: str | None  # None: the open slot a generation fills


@dataclass
class Encoded:
    input_ids: list[int]  # VIDEO_TOKEN_INDEX at each video slot
    labels: list[int]  # IGNORE_INDEX except answer tokens
    num_videos: int
    truncated: bool = False
    dropped_turns: int = 0
    answer_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.answer_tokens = sum(label != IGNORE_INDEX for label in self.labels)

    def spliced_length(self, video_tokens: int) -> int:
        return len(self.input_ids) + self.num_videos * (video_tokens - 1)


def parse_conversation(conversations: list[dict] | str, *, add_video: bool = False) -> list[Turn]:
    """LLaVA/VideoInstruct turns (``[{"from": "human"|"gpt", "value": ...}, ...]``, or that list as JSON) → turns.

    ``add_video`` puts ``<video>`` in front of the first question when no turn has one (a video sample whose
    marker was left out); otherwise such a sample would silently carry no video."""
    if isinstance(conversations, str):
        conversations = json.loads(conversations)
    if not conversations:
        raise ConversationError("the conversation is empty")
    roles = []
    for i, turn in enumerate(conversations):
        role = turn.get("from") if isinstance(turn, dict) else None
        if role not in ROLES:
            raise ConversationError(f"turn {i} has role {role!r}; expected 'human' or 'gpt'")
        roles.append(role)
    expected = ["human", "gpt"] * (len(roles) // 2 + 1)
    if roles != expected[:len(roles)] or len(roles) % 2:
        raise ConversationError(f"turns must alternate human/gpt and end with gpt, got {roles}")
    turns = []
    for q, a in zip(conversations[0::2], conversations[1::2], strict=True):
        question = str(q["value"])
        if VIDEO_TOKEN in question:
            # the reference's preprocess_multimodal: the marker moves to the front of its turn
            question = VIDEO_TOKEN + "\n" + question.replace(VIDEO_TOKEN, "").strip()
        turns.append(Turn(question, str(a["value"])))
    if add_video and not any(VIDEO_TOKEN in t.question for t in turns):
        turns[0] = Turn(VIDEO_TOKEN + "\n" + turns[0].question.strip(), turns[0].answer)
    return turns


def render(turns: list[Turn], *, bos: str = "<bos>", eos: str = "<eos>") -> str:
    """The template as text (for display and tests; ``encode`` builds the ids segment by segment)."""
    out = bos
    for t in turns:
        out += USER + t.question + END + MODEL
        if t.answer is not None:
            out += t.answer + END + eos
    return out


def strip_video(turns: list[Turn]) -> list[Turn]:
    """The same conversation without its video markers (text-only baselines)."""
    return [Turn(t.question.replace(VIDEO_TOKEN + "\n", "").replace(VIDEO_TOKEN, ""), t.answer) for t in turns]


def _text(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _prompt(tokenizer, question: str) -> tuple[list[int], int]:
    """User turn + the model header; ``<video>`` → VIDEO_TOKEN_INDEX. Returns (ids, number of videos)."""
    chunks = (USER + question + END + MODEL).split(VIDEO_TOKEN)
    ids = _text(tokenizer, chunks[0])
    for chunk in chunks[1:]:
        ids += [VIDEO_TOKEN_INDEX, *_text(tokenizer, chunk)]
    return ids, len(chunks) - 1


def encode(turns: list[Turn], tokenizer, *, video_tokens: int, max_length: int | None = None) -> Encoded:
    """Token ids and answers-only labels of ``turns`` (see the module docstring for truncation)."""
    if video_tokens < 1:
        raise ValueError(f"video_tokens must be >= 1, got {video_tokens}")
    ids, labels = [tokenizer.bos_token_id], [IGNORE_INDEX]
    videos, truncated, dropped = 0, False, 0
    for i, turn in enumerate(turns):
        if turn.answer is None and i != len(turns) - 1:
            raise ConversationError("only the last turn may leave its answer open")
        prompt, n_vid = _prompt(tokenizer, turn.question)
        answer = [] if turn.answer is None else [*_text(tokenizer, turn.answer + END), tokenizer.eos_token_id]
        spliced = len(ids) + videos * (video_tokens - 1)
        prompt_len = len(prompt) + n_vid * (video_tokens - 1)
        if max_length is not None and spliced + prompt_len + len(answer) > max_length:
            if i > 0:  # drop this and every later turn
                truncated, dropped = True, len(turns) - i
                break
            room = max_length - spliced - prompt_len
            if room < (1 if answer else 0):
                raise ConversationError(
                    f"the prompt alone is {spliced + prompt_len} tokens ({n_vid} video(s) of {video_tokens} tokens) "
                    f"and max_length is {max_length}; raise max_length or shorten the question")
            answer, truncated = answer[:room], True
        ids += prompt + answer
        labels += [IGNORE_INDEX] * len(prompt) + answer
        videos += n_vid
    return Encoded(ids, labels, videos, truncated, dropped)


def prompt_turns(question: str, history: list[Turn] = ()) -> list[Turn]:
    """``history`` then ``question`` (answer open), holding one video as training data always does: if no turn has
    ``<video>``, it goes in front of the first turn; a marker in the question moves to its front."""
    turns = [*history, Turn(question, None)]
    if not any(VIDEO_TOKEN in t.question for t in turns):
        turns[0] = Turn(VIDEO_TOKEN + "\n" + turns[0].question.strip(), turns[0].answer)
    elif VIDEO_TOKEN in question:
        turns[-1] = Turn(VIDEO_TOKEN + "\n" + question.replace(VIDEO_TOKEN, "").strip(), None)
    return turns


def encode_prompt(question: str, tokenizer, *, video_tokens: int, history: list[Turn] = ()) -> Encoded:
    """The generation prompt for ``question`` (after ``history``), exactly as training renders it
    (:func:`prompt_turns`)."""
    return encode(prompt_turns(question, history), tokenizer, video_tokens=video_tokens)
