"""The prompt tokenizer: the checkpoint's `tokenizer.json` run by the `tokenizers` library, plus OpenVLA's rules.

The published tokenizer.json is the fast Llama-2 tokenizer the reference ran through transformers 4.40, whose
backend is exactly this file; loading it directly keeps the ids independent of how newer transformers releases
rebuild tokenizer classes. OpenVLA's rules: BOS first (the reference tokenizer adds it), then the prompt text, then
the standalone "▁" token (id 29871 for Llama-2) when the text does not already end with it, because that is how
"Out: " tokenized before the action tokens in training. The "▁" id is looked up, not assumed.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

SPACE_PIECE = "\u2581"  # SentencePiece's word-boundary marker "▁"


def _token_text(value) -> str | None:
    """special_tokens_map / tokenizer_config store a token either as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class PromptTokenizer:
    def __init__(self, tokenizer: Tokenizer, bos_token: str = "<s>"):
        self.tokenizer = tokenizer
        self.bos_id = tokenizer.token_to_id(bos_token)
        self.space_id = tokenizer.token_to_id(SPACE_PIECE)
        if self.bos_id is None:
            raise ValueError(f"the tokenizer has no BOS token {bos_token!r}")
        if self.space_id is None:
            raise ValueError(f"the tokenizer has no standalone {SPACE_PIECE!r} token")

    @classmethod
    def from_dir(cls, folder: str | Path) -> "PromptTokenizer":
        folder = Path(folder)
        bos = "<s>"
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            f = folder / name
            if f.is_file():
                bos = _token_text(json.loads(f.read_text()).get("bos_token")) or bos
                break
        return cls(Tokenizer.from_file(str(folder / "tokenizer.json")), bos)

    @property
    def base_vocab_size(self) -> int:
        """Vocabulary without added tokens such as <PAD> (32000 for Llama-2)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=False)

    def encode(self, text: str) -> list[int]:
        ids = [self.bos_id] + self.tokenizer.encode(text, add_special_tokens=False).ids
        if ids[-1] != self.space_id:
            ids.append(self.space_id)
        return ids
