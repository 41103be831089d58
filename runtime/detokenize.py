"""Streaming detokenization: token ids in, text deltas out.

Decoding is not concatenative: a UTF-8 character can span several tokens, and
SentencePiece-style decoders strip the leading space of the first token they
see. So each step decodes a small window of recent tokens and emits only the
text past what the same window's older part decoded to (the prefix-offset /
read-offset scheme of TGI and vLLM):

    ids:   ... | prefix_offset ... read_offset | held tokens ... |
                 '-- prefix_text (emitted) --'

`add` decodes ids[prefix_offset:] and emits the part past prefix_text once it
is final; then the window slides so it starts where the last delta began.
Both decodes start on the same token, so a stripped leading space cancels out.

Text is held back while it is not final yet:
- it ends in U+FFFD: a character whose bytes are still arriving;
- the decoder has ByteFallback and the last token is a `<0xNN>` byte token:
  ByteFallback turns a whole run of byte tokens into U+FFFD per byte if any of
  its bytes is invalid, so one stray byte can still change the text of the run
  (e.g. <0x41><0x80> decodes to two U+FFFD, not "A"). A run is emitted when a
  non-byte token closes it, or by flush().
- the window's text does not start with prefix_text (a decoder that rewrites
  earlier text).

Guarantee: "".join(deltas) + flush() == tokenizer.decode(ids) for any ids, as
long as no more than MAX_HELD_TOKENS tokens in a row are held back for the
U+FFFD or rewrite reasons (only garbage output does that); past it the window
text is emitted as is, so the cost per token stays bounded. Byte-fallback runs
are held without decoding at all, so they cost O(1) per token however long.

Cost per token: one or two tokenizer.decode calls over a few tokens (never more
than about 2 * MAX_HELD_TOKENS, plus a byte-fallback run once when it closes).

Why not `tokenizers.decoders.DecodeStream` (tried with tokenizers 0.22.2 behind this class's
API, 2026-12-01): it fails 8 behavioural cases of tests/test_detokenize.py: byte-fallback runs
with an invalid byte (<0x41><0x80>, <0xC3><0xA9><0x80>) stream different text from the full
decode, and random byte-fallback streams raise "Invalid prefix encountered while decoding
stream" (an exception mid-generation). So this one stays.
"""

from __future__ import annotations

import json
import re

from tokenizers import Tokenizer

# Held tokens (beyond the read offset) after which the window text is emitted
# even if it is not final yet; see the module docstring.
MAX_HELD_TOKENS = 64

_REPLACEMENT = "\ufffd"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class StreamDetokenizer:
    """Incremental decoder for one generated sequence."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._prefix_text = ""
        added = tokenizer.get_added_tokens_decoder()  # {id: AddedToken}
        # Skipped special tokens are dropped before the decoder runs, so they
        # add no text and do not close a byte-fallback run.
        self._skipped = {i for i, t in added.items() if t.special} if skip_special_tokens else set()
        self._byte_ids = _byte_fallback_ids(tokenizer)

    def add(self, token_id: int) -> str:
        """Append one token id; return the text it completes (possibly "")."""
        self.ids.append(token_id)
        if token_id in self._skipped or token_id in self._byte_ids:
            return ""
        text = self._decode(self._prefix_offset, len(self.ids))
        held = len(self.ids) - self._read_offset
        final = (
            not text.endswith(_REPLACEMENT)
            and text.startswith(self._prefix_text)
            and len(text) > len(self._prefix_text)
        )
        if not final and held <= MAX_HELD_TOKENS:
            return ""
        return self._advance(text)

    def flush(self) -> str:
        """Return whatever is still held back; call once generation ends."""
        if self._read_offset == len(self.ids):
            return ""
        return self._advance(self._decode(self._prefix_offset, len(self.ids)))

    def _advance(self, text: str) -> str:
        """Emit text (the window's decode) past prefix_text and slide the window."""
        delta = text[len(self._prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        return delta

    def _decode(self, start: int, stop: int) -> str:
        return self.tokenizer.decode(self.ids[start:stop], skip_special_tokens=self.skip_special_tokens)


def _byte_fallback_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """Ids of `<0xNN>` tokens when the decoder has a ByteFallback step, else empty."""
    decoder = tokenizer.decoder
    if decoder is None or not _has_byte_fallback(json.loads(decoder.__getstate__())):
        return frozenset()
    vocab = tokenizer.get_vocab(with_added_tokens=True)  # {token: id}
    return frozenset(i for tok, i in vocab.items() if _BYTE_TOKEN.fullmatch(tok))


def _has_byte_fallback(config: dict) -> bool:
    if config.get("type") == "ByteFallback":
        return True
    return any(_has_byte_fallback(d) for d in config.get("decoders") or [])
