"""One request inside the engine, and the events it sends back.

An `ActiveRequest` owns what is private to a request: its sampler (with its own
seeded RNG), its TextStream (detokenizer, stop matcher, finish reason: the same
as stream_generate's, runtime/decode.py), its counters and clock, and once it
holds a slot its runtime.decode.Decoding. The engine feeds it one chosen token
at a time (`accept`); text deltas and the final event go out through the
`emit` callback the HTTP side gave at submit.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Union

from edge_infer.runtime.decode import Decoding, FinishReason, TextStream
from edge_infer.runtime.generate import decode_rate
from edge_infer.runtime.sampling import SamplingParams, make_sampler
from edge_infer.runtime.tools import CallWatch


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    max_tokens: int | None  # None = the engine's default
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    request_id: str = ""
    constraint: Any = None  # runtime.constrain.Constraint: the output grammar (response_format, tool calls)
    tool_plan: Any = None  # runtime.tools.ToolPlan: a call repeating an earlier one ends the reply


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

CANCELLED = FinishReason.CANCELLED.value


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


class ActiveRequest:
    def __init__(self, request: GenerationRequest, max_tokens: int, emit: Emit, handle: Handle,
                 tokenizer, eos_ids: frozenset[int]):
        self.request = request
        self.prompt = list(request.prompt_ids)
        self.max_tokens = max_tokens
        self.emit = emit
        self.handle = handle
        self.eos_ids = eos_ids
        self.sampler = make_sampler(request.sampling)
        self.text = TextStream(tokenizer, eos_ids, request.stop, max_tokens)
        self.pending: list[int] = []  # prompt ids still to prefill
        self.cached = 0
        self.arrived = time.perf_counter()
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.done = False
        self.slot: int | None = None  # the engine's slot (cache row) while it holds one
        self.decoding: Decoding | None = None  # over its slot's row, made when its prompt is in
        self.matcher = None  # runtime.constrain.GrammarMatcher for a constrained request (the Decoding drives it)
        self.calls = CallWatch(request.tool_plan) if CallWatch.wanted(request.tool_plan) else None

    @property
    def n_prompt(self) -> int:
        return len(self.prompt)

    @property
    def generated(self) -> int:
        return self.text.generated

    def accept(self, token: int) -> tuple[str, FinishReason | None]:
        """Record a chosen token; return the text it releases and, when the sequence ends, why
        (an eos ends without text; a stop string cuts the text; at max_tokens the held-back text
        is flushed)."""
        now = time.perf_counter()
        self.first_at = self.first_at or now
        self.last_at = now
        text, reason = self.text.add(token)
        if self.decoding is not None:
            reason = self.decoding.finish(self.text.generated, reason)  # the grammar is complete: STOP
        if reason is None and self.calls is not None and self.calls.feed(text):
            reason = FinishReason.STOP  # a tool call repeated an earlier one: the list ends before it
        if reason is None:
            return text, None
        tail, reason = self.text.tail(reason)
        return text + tail, reason

    def usage(self) -> Usage:
        return Usage(self.n_prompt, self.generated, self.cached)

    def finished(self, reason: str) -> Finished:
        first = self.first_at or time.perf_counter()
        rate = decode_rate(self.generated, first, self.last_at)
        return Finished(reason, self.usage(), first - self.arrived, rate, self.text.stops.matched)
