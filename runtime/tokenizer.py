"""The tokenizer an export ships (`tokenizer.json`), through the `tokenizers` library only."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from edge_infer.runtime.errors import ModelFileError
from edge_infer.runtime.manifest import TokenizerSpec


class Tokenizer:
    def __init__(self, path: Path, spec: TokenizerSpec):
        try:
            self.backend = _HFTokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception on bad JSON
            raise ModelFileError(f"{path}: cannot be read as a tokenizer ({e})") from None
        self.spec = spec
        self.eos_ids = frozenset(spec.eos_token_ids)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids for `text`; special-token text such as `<|im_start|>` maps to its single id."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
