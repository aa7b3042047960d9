"""Tokenizers, read from a local directory for real runs or trained offline from a corpus for the demo.

CLIP (the CLIP-ViP text tower): the trained tokenizer is a real ``transformers.CLIPTokenizer`` (same normaliser, pre-tokeniser, ``</w>``
end-of-word BPE and special tokens), only with a vocabulary learned from the synthetic captions, so the same code
path serves both. Special tokens come first: ``<|startoftext|>`` = 0, ``<|endoftext|>`` = 1 (the tiny preset's
bos/eos ids). As in CLIP, padding uses the EOS token, so masks must come from ``attention_mask``.

Gemma (the LLM): a real ``transformers.GemmaTokenizer`` (byte-fallback BPE, spaces as ``▁``, no prefix space) with
Gemma's special-token ids (pad 0, eos 1, bos 2, unk 3) and the turn markers ``<start_of_turn>``/``<end_of_turn>``
as special tokens, again with a vocabulary learned from the synthetic corpus. Real runs read Gemma's tokenizer
directory.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, CLIPTokenizer, GemmaTokenizer, PreTrainedTokenizerBase

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
TURN_TOKENS = ("<start_of_turn>", "<end_of_turn>")
GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", *TURN_TOKENS)  # ids 0..6 (pad 0, eos 1, bos 2)


class TokenizerError(ValueError):
    """A tokenizer directory is missing or unusable; the message names the path and the fix."""


def _read_local(cls, directory: str | Path, point_at: str):
    """``cls.from_pretrained`` of a local directory only, with errors that say what to point where."""
    directory = Path(directory)
    if not directory.is_dir():
        raise TokenizerError(f"tokenizer directory {directory} does not exist; point {point_at}")
    names = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
    if not any((directory / n).is_file() for n in names):  # e.g. a merged HiLight directory saved without one
        raise TokenizerError(f"{directory} holds no tokenizer files (none of {', '.join(names)}); point {point_at}")
    try:
        return cls.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"cannot read a tokenizer from {directory}: {exc}") from exc


def load_clip_tokenizer(directory: str | Path, max_length: int | None = None) -> CLIPTokenizer:
    """A CLIP tokenizer saved with ``save_pretrained`` (vocab.json + merges.txt or tokenizer.json). Never
    downloads."""
    tok = _read_local(CLIPTokenizer, directory, "tokenizer.dir at a local copy of openai/clip-vit-base-patch16's "
                                                "tokenizer files")
    if max_length is not None:
        tok.model_max_length = max_length
    return tok


def build_clip_tokenizer(texts: Iterable[str], out_dir: str | Path, *, vocab_size: int = 1024,
                         max_length: int = 32) -> CLIPTokenizer:
    """Train CLIP-style BPE on ``texts`` and save it to ``out_dir`` (deterministic for the same texts)."""
    template = CLIPTokenizer()  # empty vocab; provides CLIP's normaliser and pre-tokeniser
    backend = Tokenizer(models.BPE(unk_token=EOS, end_of_word_suffix="</w>", continuing_subword_prefix=""))
    backend.normalizer = template.backend_tokenizer.normalizer
    backend.pre_tokenizer = template.backend_tokenizer.pre_tokenizer
    # vocab_size - 256 leaves room for the byte + </w> tokens added below
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), end_of_word_suffix="</w>")
    backend.train_from_iterator(sorted(set(texts)), trainer=trainer)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(backend.to_str())["model"]["merges"]]
    # Rebuild the vocabulary the way CLIP's is laid out — specials, every byte, every byte + </w>, then one token
    # per merge in merge order — so ids are deterministic (the trainer adds alphabet tokens in hash order) and
    # no byte is ever unknown.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for token in [BOS, EOS, *alphabet, *(c + "</w>" for c in alphabet)]:
        vocab.setdefault(token, len(vocab))
    if len(vocab) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is too small for CLIP's byte alphabet ({len(vocab)} tokens)")
    kept = []
    for merge in merges:  # merges are ordered by priority, so the tail can be dropped to fit vocab_size
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault("".join(merge), len(vocab))
        kept.append(merge)
    merges = kept
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    return load_clip_tokenizer(out_dir, max_length)


def load_llm_tokenizer(directory: str | Path) -> PreTrainedTokenizerBase:
    """The LLM's tokenizer from a local directory (Gemma's, or one built by ``build_gemma_tokenizer``). It must
    know the chat template's turn markers as single tokens and have bos/eos/pad ids. Never downloads."""
    tok = _read_local(AutoTokenizer, directory, "llm.dir (or llm.tokenizer_dir) at a local Gemma tokenizer "
                                                "(tokenizer.json + tokenizer_config.json)")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tok, name) is None:
            raise TokenizerError(f"the tokenizer in {directory} has no {name[:-3]}; Gemma's has <bos>/<eos>/<pad>")
    for marker in TURN_TOKENS:
        ids = tok(marker, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise TokenizerError(f"the tokenizer in {directory} splits {marker} into {len(ids)} tokens; the Gemma chat "
                                 "template needs it as one token (use Gemma's tokenizer)")
    return tok


def build_gemma_tokenizer(texts: Iterable[str], out_dir: str | Path, *, vocab_size: int = 512) -> PreTrainedTokenizerBase:
    """Train a Gemma-style tokenizer on ``texts`` and save it to ``out_dir`` (deterministic for the same texts)."""
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]  # byte fallback: no character is ever unknown
    base = len(GEMMA_SPECIALS) + len(byte_tokens)
    if vocab_size <= base:
        raise ValueError(f"vocab_size {vocab_size} leaves no room for merges (specials + bytes take {base})")
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    # sentencepiece-style pieces ("▁word") with line breaks on their own: no merge spans a word or a line break, so
    # GemmaTokenizer (which runs BPE on the whole normalised string) splits text exactly as the trainer did, and
    # the chat template's segments ("...model\n" | answer) tokenise the same alone as joined
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=True)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[*GEMMA_SPECIALS, *byte_tokens],
                                  show_progress=False)
    backend.train_from_iterator(sorted(set(texts)), trainer=trainer)
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = GemmaTokenizer(vocab=model["vocab"], merges=merges, add_bos_token=True,
                         additional_special_tokens=list(TURN_TOKENS))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    return load_llm_tokenizer(out_dir)
