"""The tokenizer an export ships (`tokenizer.json`), through the `tokenizers` library only."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from edge_infer.contract.errors import ModelFileError, TokenizerError, check_text, is_interrupt
from edge_infer.runtime.manifest import TokenizerSpec


class Tokenizer:
    def __init__(self, path: Path, spec: TokenizerSpec):
        try:
            self.backend = _HFTokenizer.from_file(str(path))
        except BaseException as e:  # a bare Exception on bad JSON; a PanicException (BaseException) on worse
            if is_interrupt(e):
                raise
            raise ModelFileError(f"{path}: cannot be read as a tokenizer ({type(e).__name__}: "
                                 f"{str(e)[:300]})") from None
        self.spec = spec
        self.path = path
        self.eos_ids = frozenset(spec.eos_token_ids)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids for `text`; special-token text such as `<|im_start|>` maps to its single id."""
        check_text(text, "the text to tokenize")
        try:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        except BaseException as e:  # the library panics (PanicException is a BaseException)
            raise self._failed("encode", e) from None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        try:
            return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        except BaseException as e:
            raise self._failed("decode", e) from None

    def _failed(self, what: str, e: BaseException) -> BaseException:
        if is_interrupt(e):
            return e
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        return TokenizerError(f"{self.path}: the model's tokenizer failed to {what} this text "
                              f"({type(e).__name__}: {detail}); the tokenizer file is faulty for this input")
