"""One request inside the engine, and the events it sends back.

A `Sequence` owns what is private to a request: its sampler (with its own
seeded RNG), its detokenizer and stop matcher, its counters and clock. The
engine feeds it one sampled token at a time (`accept`); text deltas and the
final event go out through the `emit` callback the HTTP side gave at submit.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Union

from edge_infer.runtime.detokenize import StreamDetokenizer
from edge_infer.runtime.generate import FinishReason
from edge_infer.runtime.sampling import SamplingParams, make_sampler
from edge_infer.runtime.stops import StopMatcher


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    max_tokens: int | None  # None = the engine's default
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    request_id: str = ""
    constraint: Any = None  # runtime.constrain.Constraint: the output grammar (response_format, tool calls)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int  # every sampled token, an eos included
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" | "length" | "cancelled"
    usage: Usage
    time_to_first_token: float  # seconds from submit (queue wait included)
    decode_tokens_per_s: float
    stop_sequence: str | None = None  # the stop string that ended it, if one did


@dataclass(frozen=True)
class Failed:
    message: str
    status: int  # HTTP status the request ends with
    code: str


Event = Union[Delta, Finished, Failed]
Emit = Callable[[Event], None]

CANCELLED = "cancelled"


class Handle:
    """What `Engine.submit` returns: lets the HTTP side cancel its request."""

    def __init__(self, request_id: str, wake: Callable[[], None]):
        self.request_id = request_id
        self._cancelled = threading.Event()
        self._wake = wake

    def cancel(self) -> None:
        """Ask the engine to drop the request; its slot is freed at the next step. Idempotent."""
        if not self._cancelled.is_set():
            self._cancelled.set()
            self._wake()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class Sequence:
    def __init__(self, request: GenerationRequest, max_tokens: int, emit: Emit, handle: Handle,
                 tokenizer, eos_ids: frozenset[int]):
        self.request = request
        self.prompt = list(request.prompt_ids)
        self.max_tokens = max_tokens
        self.emit = emit
        self.handle = handle
        self.eos_ids = eos_ids
        self.sampler = make_sampler(request.sampling)
        self.detok = StreamDetokenizer(tokenizer)
        self.stops = StopMatcher(list(request.stop))
        self.context = list(request.prompt_ids)  # prompt + generated ids, for the penalties
        self.pending: list[int] = []  # prompt ids still to prefill
        self.next_token: int | None = None  # sampled, not yet fed to the model
        self.cached = 0
        self.generated = 0
        self.arrived = time.perf_counter()
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.done = False
        self.guesser = None  # runtime.speculative_guess.Guesser, made when the engine first speculates for it
        self.matcher = None  # runtime.constrain.GrammarMatcher, set by the engine for a constrained request

    @property
    def n_prompt(self) -> int:
        return len(self.prompt)

    def sample(self, logits, mask=None) -> int:
        """logits: (vocab,) for the position after the last fed token; mask: (words,) this step's grammar
        bitmask when the engine computed it already (else the matcher computes it here)."""
        if self.matcher is not None:
            logits = self.matcher.mask(logits, mask)  # before penalties and sampling
        return self.sampler(logits, self.context, self.n_prompt)

    def accept(self, token: int) -> tuple[str, FinishReason | None]:
        """Record a sampled token; return the text it releases and, when the sequence ends, why.

        Mirrors runtime.generate.stream_generate: an eos ends without text; a
        stop string cuts the text; at max_tokens the held-back text is flushed.
        """
        now = time.perf_counter()
        self.first_at = self.first_at or now
        self.last_at = now
        self.generated += 1
        self.context.append(token)
        if token in self.eos_ids:
            return self._flush("", FinishReason.STOP)
        if self.matcher is not None:
            self.matcher.accept(token)
        text, stopped = self.stops.feed(self.detok.add(token))
        if stopped:
            return text, FinishReason.STOP
        if self.matcher is not None and self.matcher.finished:  # the grammar is complete
            return self._flush(text, FinishReason.STOP)
        if self.generated >= self.max_tokens:
            return self._flush(text, FinishReason.LENGTH)
        return text, None

    def _flush(self, text: str, reason: FinishReason) -> tuple[str, FinishReason]:
        tail, stopped = self.stops.feed(self.detok.flush())
        if stopped:
            return text + tail, FinishReason.STOP
        tail += self.stops.flush()
        return text + tail, FinishReason.STOP if self.stops.stopped else reason

    def usage(self) -> Usage:
        return Usage(self.n_prompt, self.generated, self.cached)

    def finished(self, reason: str) -> Finished:
        first = self.first_at or time.perf_counter()
        span = (self.last_at or first) - first
        rate = (self.generated - 1) / span if self.generated > 1 and span > 0 else 0.0
        return Finished(reason, self.usage(), first - self.arrived, rate, self.stops.matched)
