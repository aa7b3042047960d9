"""Caption token counting for the contract's length limit."""

from __future__ import annotations

from pathlib import Path

import regex

# CLIP's pre-tokenisation pattern (openai/CLIP simple_tokenizer.py): BPE never merges across these
# pieces, so their count (+2 for start/end tokens) is a lower bound on the BPE token count.
_CLIP_PIECES = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)


class TokenCounter:
    """Counts tokens with a local tokenizer when given one, else with CLIP's pre-tokeniser.

    Args:
        tokenizer_dir: a local Hugging Face tokenizer directory (e.g. a CLIP tokenizer). Without
            one, counts are the lower bound described above: captions over the limit are always
            caught, captions just under it may still be truncated by the real BPE.
    """

    def __init__(self, tokenizer_dir: Path | None = None):
        self.tokenizer = None
        if tokenizer_dir is not None:
            from transformers import AutoTokenizer

            if not Path(tokenizer_dir).is_dir():
                raise FileNotFoundError(f"tokenizer_dir {tokenizer_dir} does not exist; point it at a local tokenizer directory")
            self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)

    @property
    def exact(self) -> bool:
        return self.tokenizer is not None

    def __call__(self, text: str) -> int:
        if self.tokenizer is not None:
            return len(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        return len(_CLIP_PIECES.findall(text.lower())) + 2
