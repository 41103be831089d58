"""The decoding core shared by stream_generate and the server's engine.

  Decoding       one sequence's state: its sampler, the ids so far, its KV cache (a batch-1
                 cache or one row of the server's), and a AdaptiveProposer when it speculates;
                 `stream` is decode_tokens' loop, `finish` the grammar-complete rule that
                 stream_generate and the server both apply
  decode_step    ONE model pass over any number of Decodings: each feeds its last sampled
                 token plus its guesses (none: a plain step); every row's guesses are verified
                 and its cache trimmed past its own first rejection
  TextStream     sampled ids -> text deltas and a FinishReason (eos, stop strings, max_tokens)

Plain decoding is a round with no guesses, so a plain step, a speculative round and a row of
the server's batched step are the same code. Model.forward_rows pads one-id rows, so a
position's logits do not depend on how its pass was grouped: greedy speculation gives the ids
of plain decoding on int4/int8 exports as well as on fp32 ones.

A grammar (runtime/constrain.py) rides along in the Decoding: the first token and every
verification row are masked before sampling, tokens the grammar forces are fed as guesses (they
are always accepted: their masked rows allow nothing else), other guesses are cut where the
grammar refuses them, and the matcher consumes exactly the ids the round emits. Rows without
guesses get their masks on llguidance's thread pool while the model runs (`decode_step`).
"""

from __future__ import annotations

import enum
import time
from typing import Any, Generator, Sequence

import numpy as np

from edge_infer.runtime.cache import KVCache
from edge_infer.runtime.constrain import MaskPool, constrain_guesses, mask_rows
from edge_infer.runtime.detokenize import StreamDetokenizer
from edge_infer.runtime.model import Model
from edge_infer.runtime.sampling import Sampler
from edge_infer.runtime.speculative import SpeculativeConfig, SpecStats, check_draft, verify
from edge_infer.runtime.speculative_proposers import VERIFY_COST, AdaptiveProposer, pass_width
from edge_infer.runtime.stops import StopMatcher

# Prompt ids per prefill pass. A pass's activations grow with its ids (gate/up at 1.5B: 70 KB per id) and
# onnxruntime's arena keeps them; 4-bit MatMulNBits costs the same per row from 64 rows up. Measured at
# prompt 1024, Intel Xeon, 2 threads (benchmarks/RESULTS.md): 128 against 512 keeps prefill time within
# -5%..+1% (135M 1.73-1.77 against 1.83-1.88 s, 0.5B 3.45 against 3.59-3.65 s, 1.5B 15.5 against 15.4 s)
# and the 1.5B peak RSS 104 MiB lower.
PREFILL_CHUNK = 128


class FinishReason(str, enum.Enum):
    STOP = "stop"  # an eos token or a stop string
    LENGTH = "length"  # max_tokens reached, or the context is full
    CANCELLED = "cancelled"  # the client went away (server)
    TOOL_CALLS = "tool_calls"  # the reply is tool calls (Chunk.tool_calls)


def prefill(model: Model, ids: list[int], cache: KVCache, chunk: int = PREFILL_CHUNK) -> np.ndarray:
    """Run the prompt through the model in chunks; returns the last position's logits (vocab,)."""
    assert ids, "prefill needs at least one token"
    logits = np.empty(0)
    for start in range(0, len(ids), chunk):
        piece = np.asarray(ids[start:start + chunk], dtype=np.int64)[None, :]  # (1, chunk)
        logits = model.forward(piece, cache)
    return logits[0, -1]


class Decoding:
    """One sequence between its prompt and its last token.

    `cache` holds every id but the last sampled one (`token`), which the next round feeds.
    With `speculative` set, each round feeds guesses after it as well.
    """

    def __init__(self, model: Model, prompt: Sequence[int], sampler: Sampler, cache: KVCache,
                 speculative: SpeculativeConfig | None = None, draft_cache: KVCache | None = None,
                 stats: SpecStats | None = None, matcher=None):
        self.model, self.sampler, self.cache = model, sampler, cache
        self.matcher = matcher  # runtime.constrain.GrammarMatcher (or a lazy one), or None
        self.grammar_done_at: int | None = None  # len(tokens) once the grammar is complete
        self.tokens = list(prompt)  # prompt + sampled ids (the penalties and the proposer read them)
        self.n_prompt = len(self.tokens)
        self.token: int | None = None  # sampled, not yet fed
        self.stats = stats if stats is not None else SpecStats()
        self.proposer: AdaptiveProposer | None = None
        if speculative is not None:
            self.stats.mode = speculative.mode
            draft = speculative.draft
            if draft is not None:
                check_draft(model, draft)
                if draft_cache is None:
                    draft_cache = draft.new_cache(max_length=min(draft.max_length, cache.max_length))
            self.proposer = AdaptiveProposer(model, sampler, self.tokens, speculative.max_guesses,
                                   use_lookup=speculative.mode == "lookup" or speculative.use_lookup,
                                   draft=draft, draft_cache=draft_cache, draft_cost=speculative.draft_cost)
        self._feed: list[int] = []
        self._guesses: list[int] = []
        self._qs: Any = None  # the proposer's distributions for the guesses (None: greedy or forced)
        self._masks: list | None = None  # per verification row (words,), under a grammar
        self._forced = False  # this round's guesses are the grammar's forced tokens

    def first(self, logits: np.ndarray) -> int:
        """Sample the first token from the prompt's last logits (vocab,)."""
        if self.matcher is not None:
            logits = self.matcher.mask(logits)  # before penalties and sampling
        self.token = self.sampler(logits, self.tokens, self.n_prompt)
        self._consume([self.token])
        self.tokens.append(self.token)
        return self.token

    def propose(self, limit: int) -> list[int]:
        """The ids this round feeds: the last token and up to `limit` guesses."""
        assert self.token is not None and self.cache.offset == len(self.tokens) - 1, \
            "the cache holds every id but the last sampled one"
        self._guesses, self._qs, self._masks, self._forced = [], None, None, False
        # Tokens the grammar forces are certain guesses (their masked rows allow nothing else); the
        # proposer's proposal is taken instead when it goes on past them.
        forced = self.matcher.forced()[:limit] if self.matcher is not None and limit > 0 else []
        if self.proposer is not None and limit > 0:
            guesses, qs = self.proposer.propose(self.tokens, limit)
            if len(guesses) > len(forced) and guesses[:len(forced)] == forced:
                self._guesses, self._qs = guesses, qs
        if not self._guesses and forced:
            self._guesses, self._forced = forced, True
        if self.matcher is not None and self._guesses:
            self._guesses, self._qs, self._masks = constrain_guesses(self.matcher, self._guesses, self._qs)
        self._feed = [self.token] + self._guesses
        return self._feed

    def guess_odds(self) -> float:
        """The chance that each of this round's guesses is accepted, as estimated when they were chosen
        (the grammar's forced tokens are certain)."""
        if self._forced:
            return 1.0
        return self.proposer.odds() if self.proposer is not None and self._guesses else 0.0

    def keep_guesses(self, n: int) -> list[int]:
        """Verify only the first n of this round's guesses (a batched pass chose its width); returns the feed."""
        if len(self._guesses) > n:
            self._guesses = self._guesses[:n]
            self._qs = self._qs[:n] if self._qs is not None else None
            self._masks = self._masks[:n + 1] if self._masks is not None else None
            self._feed = self._feed[:n + 1]
        return self._feed

    def needs_mask(self) -> bool:
        """A row-0 mask this round still lacks (decode_step computes those while the model runs)."""
        return self.matcher is not None and self._masks is None and getattr(self.matcher, "active", True)

    def settle(self, rows: np.ndarray) -> list[int]:
        """Take the pass's logits rows (k + 1, vocab) for the fed ids: verify the guesses, keep the
        fed token and the accepted guesses in the cache (the pass advanced it by every fed id; the
        rejected guesses are trimmed off), and return the ids this round emits."""
        if self.matcher is not None:  # each row masked by the grammar state it follows
            if self._masks is not None:
                rows = mask_rows(rows, self._masks)
            else:
                rows = np.concatenate([self.matcher.mask(rows[0])[None], rows[1:]])
        accepted, nxt = verify(rows, self._guesses, self._qs, self.tokens, self.n_prompt, self.sampler)
        if accepted < len(self._guesses):  # their entries stay past the row's length, where the next pass overwrites them
            self.cache.trim(len(self.tokens) + accepted)  # tokens so far (the fed one included) + the accepted
        emitted = self._guesses[:accepted] + [nxt]
        self._consume(emitted)
        if self.proposer is not None and not self._forced:
            self.stats.target_passes += 1
            self.stats.proposed += len(self._guesses)
            self.stats.accepted += accepted
            self.proposer.record(self._guesses, accepted, emitted)
        self.tokens.extend(emitted)
        self.token = nxt
        return emitted

    def _consume(self, emitted: list[int]) -> None:
        """The grammar takes the ids this round emits (before they join `tokens`); an eos ends it
        unconsumed. Records where the grammar completed: nothing but eos may follow."""
        if self.matcher is None or self.grammar_done_at is not None:
            return
        eos = self.model.tokenizer.eos_ids
        for i, t in enumerate(emitted):
            if t in eos:
                return
            self.matcher.accept(t)
            if self.matcher.finished:
                self.grammar_done_at = len(self.tokens) + i + 1
                return

    def grammar_done(self, n_tokens: int) -> bool:
        """Whether the grammar was complete once tokens[:n_tokens] were emitted."""
        return self.grammar_done_at is not None and n_tokens >= self.grammar_done_at

    def finish(self, generated: int, reason: FinishReason | None) -> FinishReason | None:
        """The grammar-complete rule (stream_generate and the server alike): once the first `generated`
        sampled ids complete the grammar, the sequence ends with STOP (nothing but eos may follow), also
        where max_tokens ends it on that id; `reason` is what TextStream said for that id."""
        if reason in (None, FinishReason.LENGTH) and self.grammar_done(self.n_prompt + generated):
            return FinishReason.STOP
        return reason

    def stream(self, max_tokens: int, ignore_eos: bool = False) -> Generator[int, None, None]:
        """decode_tokens' loop over this Decoding (its cache, sampler, grammar): reuse the cached prefix
        of the prompt, prefill the rest, then yield up to max_tokens sampled ids, stopping after an eos id
        (unless ignore_eos) or once the grammar is complete."""
        model, cache, ids = self.model, self.cache, self.tokens[:self.n_prompt]
        eos = frozenset() if ignore_eos else model.tokenizer.eos_ids
        reuse = cache.reuse(ids)
        token = self.first(prefill(model, ids[reuse:], cache))
        yield token
        produced = 1
        while produced < max_tokens and token not in eos and not self.grammar_done(len(ids) + produced):
            # A round yields up to k + 1 ids; the cache must hold the fed ones.
            limit = min(max_tokens - produced - 1, cache.max_length - cache.offset - 1)
            for token in decode_step(model, cache, [self], [limit])[0]:
                yield token
                produced += 1
                if produced == max_tokens or token in eos or self.grammar_done(len(ids) + produced):
                    return


_masks: MaskPool | None = None


def _mask_pool() -> MaskPool:
    global _masks
    if _masks is None:
        _masks = MaskPool()
    return _masks


def decode_step(model: Model, cache: KVCache, decodings: list[Decoding | None],
                limits: list[int]) -> list[list[int]]:
    """One pass of `model` over the rows of `cache` (row r belongs to decodings[r]; None: idle).

    limits[r] caps row r's guesses. Returns the ids each row emits (empty for idle rows).
    """
    active = [d for d in decodings if d is not None]
    if not model.ragged_rows and len(active) > 1:
        limits = [0] * len(limits)  # one id per row in a batched pass (Model.describe_graph says why)
    feeds = [d.propose(limit) if d is not None else [] for d, limit in zip(decodings, limits)]
    if len(active) > 1 and max(map(len, feeds)) > 1:
        feeds = _batch_guesses(model, decodings, feeds)
    masked = [d for d in decodings if d is not None and d.needs_mask()]
    pending = _mask_pool().submit([d.matcher for d in masked]) if masked else None  # overlaps the pass
    clock = time.perf_counter()
    rows = model.forward_rows(feeds, cache)  # per row (n_r, vocab); each row after its cached length
    seconds = time.perf_counter() - clock
    if pending is not None:
        for d, mask in zip(masked, pending.result()):
            d._masks = [mask]
    if len(active) == 1 and active[0].proposer is not None:  # a pass's time says what its width costs
        active[0].proposer.costs.target_pass(len(feeds[decodings.index(active[0])]), seconds)
    return [d.settle(r) if d is not None else [] for d, r in zip(decodings, rows)]


def _batch_guesses(model: Model, decodings: list[Decoding | None], feeds: list[list[int]]) -> list[list[int]]:
    """Cut every row's guesses to the one width worth its cost for the whole pass
    (speculative_proposers.pass_width); a row's own proposer weighed only its own ids."""
    odds = [(len(f) - 1, d.guess_odds()) for d, f in zip(decodings, feeds) if d is not None]
    costs = [d.proposer.costs.per_token for d in decodings if d is not None and d.proposer is not None]
    per_token = costs[0] if costs else VERIFY_COST["quantized" if model.manifest.quantization.bits else "float"]
    width = pass_width(odds, len(feeds), per_token, padded=model.pad_ids)
    return [d.keep_guesses(width - 1) if d is not None else f for d, f in zip(decodings, feeds)]


def decode_tokens(model: Model, ids: list[int], cache: KVCache, sampler: Sampler, max_tokens: int,
                  speculative: SpeculativeConfig | None = None, stats: SpecStats | None = None,
                  draft_cache: KVCache | None = None, ignore_eos: bool = False,
                  matcher=None) -> Generator[int, None, None]:
    """Yield up to max_tokens sampled ids, stopping after an eos id (unless ignore_eos) or once a
    grammar `matcher` is complete. Reuses whatever prefix of `ids` the cache already holds.
    (`Decoding(...).stream(...)`, for a caller that also asks the Decoding why it ended: `finish`.)"""
    return Decoding(model, ids, sampler, cache, speculative, draft_cache, stats, matcher).stream(max_tokens, ignore_eos)


class TextStream:
    """Sampled ids -> text deltas and why the sequence ends (runtime and server alike).

    An eos id ends it without text; a stop string cuts the text there; at max_tokens it ends
    with LENGTH. Text held back (a partial character, a possible stop string) comes out of
    `tail()` once the sequence has ended.
    """

    def __init__(self, tokenizer, eos_ids: frozenset[int], stop: Sequence[str], max_tokens: int):
        self.detok = StreamDetokenizer(tokenizer)
        self.stops = StopMatcher(list(stop))
        self.eos_ids, self.max_tokens = eos_ids, max_tokens
        self.generated = 0
        self.reason: FinishReason | None = None
        self._stopped = False  # a stop string matched: nothing is held back any more

    def add(self, token: int) -> tuple[str, FinishReason | None]:
        """The text `token` releases and, when the sequence ends with it, why."""
        self.generated += 1
        if token in self.eos_ids:
            self.reason = FinishReason.STOP
            return "", self.reason
        text, self._stopped = self.stops.feed(self.detok.add(token))
        if self._stopped:
            self.reason = FinishReason.STOP
        elif self.generated >= self.max_tokens:
            self.reason = FinishReason.LENGTH
        return text, self.reason

    def tail(self, reason: FinishReason | None = None) -> tuple[str, FinishReason]:
        """What was held back, and the final reason (a stop string in the tail makes it STOP)."""
        reason = reason or self.reason or FinishReason.LENGTH
        if self._stopped:
            return "", FinishReason.STOP
        tail, stopped = self.stops.feed(self.detok.flush())
        if stopped:
            return tail, FinishReason.STOP
        return tail + self.stops.flush(), (FinishReason.STOP if self.stops.stopped else reason)
