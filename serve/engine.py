"""The continuous-batching engine: one scheduler thread owns the model.

Each turn of the loop has three steps (as in vLLM's v1 engine), and the turn is data:

  schedule  under the lock: drop cancelled requests, move waiting requests
            into free slots (longest cached prefix first, else least recently
            used; a request keeps its slot index), and return a `Turn`: the
            one request that prefills a chunk this turn, the rows that decode
            and how many guesses each may verify;
  execute   outside the lock: at most one prefill chunk (batch 1, on the
            slot's row of the shared KV cache), then one batched pass over the
            smallest range of rows that holds every decoding slot
            (runtime.decode.decode_step, the loop stream_generate runs too;
            each row's guesses verified with its request's own sampler, its
            cache trimmed past its own first rejection); returns what each
            row chose (`Emitted`);
  update    apply it: detokenize, match stops, emit text, free the slots of
            finished requests. `Engine.observe` sees each (Turn, emitted).

A long prompt is prefilled one chunk per turn, so the other streams wait at
most one chunk for their next token. With speculation on, every decoding row
feeds its next token plus its guesses (prompt lookup or a draft model) in the
same batched pass: rows hold different numbers of new ids (the graph's
query_seqlens input), so a row that guesses well gets several tokens per pass
while the others get one. Slots keep their KV after a request ends: that is the
prefix cache. A free slot's row inside the range feeds nothing (on graphs
exported before query_seqlens, a dummy token just past its cached positions,
where nothing reads it).

While no request runs, the loop watches what other processes do on its cores
(devices/contention.py Watch) and, when the machine has changed for long
enough, reopens the model's session with its threads spinning or not
(Model.respin): the choice `load` made fits the machine at start-up, and a
server outlives it.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from edge_infer.devices import contention
from edge_infer.runtime.cache import KVCache, reusable
from edge_infer.runtime.decode import Decoding, decode_step
from edge_infer.contract.errors import UserError, is_interrupt
from edge_infer.runtime.generate import plan_max_tokens
from edge_infer.runtime.speculative import check_draft
from edge_infer.serve.config import EngineConfig
from edge_infer.serve.metrics import Metrics
from edge_infer.serve.request import (CANCELLED, Delta, Emit, Failed, GenerationRequest, Handle, ActiveRequest)

log = logging.getLogger("edge_infer.serve")

# Ids per batched pass (rows x the widest row) up to which rows may add guesses: a lone request
# verifies up to 15 guesses a pass (its AdaptiveProposer picks fewer), 4 rows up to 3 each.
BATCH_IDS = 16


class QueueFull(UserError):
    """Every slot is busy and the waiting queue is full (HTTP 429)."""


class ShuttingDown(UserError):
    """The server is stopping and takes no new requests (HTTP 503)."""


class Slot:
    """One row of the batched KV cache and the request (if any) using it."""

    def __init__(self, index: int, row):
        self.index = index
        self.row = row  # batch-1 KVCache view: its offset and tokens are this slot's cached prefix
        self.seq: ActiveRequest | None = None
        self.last_used = 0  # LRU clock value when the slot was last given a request

    def matched(self, ids: np.ndarray) -> int:
        """How many leading ids of the prompt this slot may reuse (runtime.cache.reusable, the one rule)."""
        return reusable(self.row.tokens, ids)


@dataclass(frozen=True)
class Turn:
    """One scheduler turn, decided under the lock and run outside it (vLLM v1's SchedulerOutput)."""

    prefill: ActiveRequest | None  # the request that prefills a chunk of its prompt (the oldest waiting)
    chunk: tuple[int, ...]  # the prompt ids it feeds this turn
    start: int  # the first cache row of the batched decode pass
    rows: tuple[ActiveRequest | None, ...]  # rows start, start + 1, ...: who decodes there (None: feeds nothing)
    limits: tuple[int, ...]  # per row: how many guesses it may verify besides its next token

    @property
    def requests(self) -> list[ActiveRequest]:
        """Every request this turn runs, the prefill first."""
        decoding = [q for q in self.rows if q is not None and q is not self.prefill]
        return ([self.prefill] if self.prefill is not None else []) + decoding


@dataclass(frozen=True)
class Emitted:
    """What one request's row chose in a turn: tokens in order, and its speculation this turn."""

    seq: ActiveRequest
    tokens: tuple[int, ...]
    proposed: int = 0  # guesses verified
    accepted: int = 0  # of them, accepted


TurnObserver = Callable[[Turn, list[Emitted]], None]


class Engine:
    def __init__(self, model, config: EngineConfig = EngineConfig(), metrics: Metrics | None = None,
                 watch: contention.Watch | None = None):
        config.validate()
        if model.manifest.kv_layout != "shared":
            raise UserError("serving needs a model from the direct graph builder (kv_layout shared); this one was "
                            f"exported through the {model.manifest.graph.route} route")
        self.model = model
        self.config = config
        self.metrics = metrics or Metrics()
        self.cache = model.new_cache(batch=config.parallel, max_length=config.max_length)
        self.max_length = self.cache.max_length
        for buffer in self.cache.keys + self.cache.values:
            buffer.fill(0)  # commit the KV memory now: RSS stays flat under load, and too big fails at start
        self.slots = [Slot(i, self.cache.row(i)) for i in range(config.parallel)]
        self._views: dict[tuple[int, int], KVCache] = {}  # (start, stop) -> KVCache over those rows
        self._waiting: collections.deque[ActiveRequest] = collections.deque()
        self._cond = threading.Condition()
        self._clock = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stop = False  # set by stop(): end everything and leave the loop
        self._drain_deadline: float | None = None  # set by begin_shutdown(): refuse new, end active at it
        self.metrics.slots_total.set(config.parallel)
        self._observers: list[TurnObserver] = []
        self.speculative = config.speculative
        self.draft_cache = None  # one draft cache, synced to whichever request speculates (prefix reuse)
        if self.speculative is not None and self.speculative.draft is not None:
            draft = self.speculative.draft
            check_draft(model, draft)
            self.draft_cache = draft.new_cache(max_length=min(draft.max_length, self.max_length))
        # The spinning follows the idle machine where the model's own thread pool allows it (a draft model
        # shares the process-wide pool, whose spinning onnxruntime fixed when it made it).
        self._watch = (watch or model.spinning_watch()) if model.respinnable and self.draft_cache is None else None
        self.metrics.spinning.set(int(getattr(model, "spinning", contention.Spinning(True, "")).on))

    # -- the HTTP side -----------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="edge-infer-engine", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest, emit: Emit) -> Handle:
        """Queue a request; events go to `emit`, called from the engine thread.

        Raises ContextLengthError (prompt or max_tokens do not fit a slot),
        QueueFull or ShuttingDown, before any work is done.
        """
        n_prompt, default = len(request.prompt_ids), self.config.default_max_tokens
        max_tokens = plan_max_tokens(self.model, n_prompt, request.max_tokens, self.max_length)
        if request.max_tokens is None:  # the rest of the context (as the OpenAI API), or the configured default
            max_tokens = min(default or self.max_length, self.max_length - n_prompt)
        handle = Handle(request.request_id, self._wake)
        seq = ActiveRequest(request, max_tokens, emit, handle, self.model.tokenizer.backend, self.model.tokenizer.eos_ids)
        if request.constraint is not None:  # its own grammar state from the first token, prefix-cache hit or not
            seq.matcher = request.constraint.matcher(self.model)
        with self._cond:
            if self._stop or self._drain_deadline is not None:
                raise ShuttingDown("the server is shutting down and takes no new requests")
            free = sum(s.seq is None for s in self.slots)  # requests about to take a free slot do not wait
            if len(self._waiting) >= self.config.max_queue + free:
                raise QueueFull(
                    f"the server is at capacity: {self.config.parallel} requests running and "
                    f"{len(self._waiting)} waiting; retry shortly"
                )
            self._waiting.append(seq)
            self.metrics.queue_depth.set(len(self._waiting))
            self._cond.notify()
        return handle

    def begin_shutdown(self, grace_s: float | None = None) -> None:
        """Refuse new requests; requests still running after the grace period end with an error.

        Only sets a field, so it is safe to call from a signal handler.
        """
        grace = self.config.shutdown_grace_s if grace_s is None else grace_s
        if self._drain_deadline is None:
            self._drain_deadline = time.monotonic() + grace

    def stop(self, timeout: float = 10.0) -> None:
        """End every request and join the scheduler thread."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def snapshot(self) -> dict:
        """Counts for /health and tests: busy slots and waiting requests."""
        with self._cond:
            return {"slots": len(self.slots), "busy": sum(s.seq is not None for s in self.slots),
                    "waiting": len(self._waiting)}

    def observe(self, observer: TurnObserver) -> None:
        """Call `observer(turn, emitted)` on the engine thread after each turn is applied (tests, tracing)."""
        self._observers.append(observer)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # -- the scheduler thread ----------------------------------------------------

    def _loop(self) -> None:
        while True:
            turn: Turn | None = None
            spinning: contention.Spinning | None = None
            with self._cond:
                self._reap()
                if self._stop and not self._busy():
                    return
                self._admit()
                if not self._busy():
                    spinning = self._idle_wait()
                else:
                    if self._watch is not None:
                        self._watch.busy()
                    turn = self._schedule()
            if spinning is not None:  # outside the lock: requests queue while the session reopens
                self._respin(spinning)
            if turn is None:
                continue
            try:
                emitted = self._execute(turn)
            except BaseException as e:  # a failed run (even a library panic, a BaseException) must not take the
                if is_interrupt(e):  # server down: fail its requests, keep scheduling the others
                    raise
                log.error("model step failed: %s: %s", type(e).__name__, e, exc_info=not isinstance(e, UserError))
                for seq in turn.requests:
                    self._slot(seq).row.trim(0)  # its cached KV can no longer be trusted
                    self._finish(seq, Failed("internal error while generating", 500, "internal_error"))
                continue
            self._update(turn, emitted)
            for observer in self._observers:
                observer(turn, emitted)

    def _idle_wait(self) -> contention.Spinning | None:
        """Wait (under the lock) for a request; the spinning the idle machine now calls for, if it changed."""
        timeout = 0.5 if self._drain_deadline is not None else None
        left = self._watch.idle() if self._watch is not None else None
        if left is not None:
            timeout = left if timeout is None else min(timeout, left)
        self._cond.wait(timeout=timeout)
        if self._watch is None or self._waiting or self._stop or self._drain_deadline is not None:
            return None
        return self._watch.poll()

    def _respin(self, spinning: contention.Spinning) -> None:
        """Reopen the model's session with its threads spinning or not (Model.respin); where that fails the
        session is as it was (or, failing that too, each request gets a 500), and the watch stops."""
        assert self._watch is not None
        try:
            seconds = self.model.respin(spinning)
        except Exception as e:  # noqa: BLE001 - the server keeps serving with what it had
            log.error("reopening the session with threads spinning %s failed (%s); the spinning stays as it was",
                      "on" if spinning.on else "off", e)
            self._watch = None
            return
        self._watch.now_on(spinning.on)
        self.metrics.spinning.set(int(spinning.on))
        self.metrics.session_reopens.inc()
        log.info("threads spinning %s (session reopened in %.1f s): %s", "on" if spinning.on else "off",
                 seconds, spinning.reason)

    def _busy(self) -> bool:
        return any(s.seq is not None for s in self.slots)

    def _reap(self) -> None:
        """Drop cancelled requests, and everything when stopping or past the drain deadline."""
        ending = self._stop or (self._drain_deadline is not None and time.monotonic() >= self._drain_deadline)
        shutdown = Failed("the server is shutting down", 503, "server_shutting_down")
        for seq in list(self._waiting):
            if seq.handle.cancelled or ending or self._drain_deadline is not None:
                self._waiting.remove(seq)
                self._finish(seq, seq.finished(CANCELLED) if seq.handle.cancelled else shutdown)
        for slot in self.slots:
            if slot.seq is not None and (slot.seq.handle.cancelled or ending):
                seq = slot.seq
                self._finish(seq, seq.finished(CANCELLED) if seq.handle.cancelled else shutdown)
        self.metrics.queue_depth.set(len(self._waiting))

    def _admit(self) -> None:
        """Move waiting requests into free slots, oldest request first."""
        while self._waiting:
            free = [s for s in self.slots if s.seq is None]
            if not free:
                return
            seq = self._waiting.popleft()
            ids = np.asarray(seq.prompt, dtype=np.int64)  # (n_prompt,)
            # Longest cached prefix wins; among equal matches, the slot that loses the fewest cached
            # tokens beyond it; among slots that match nothing, the least recently used one.
            def rank(s: Slot, ids: np.ndarray = ids) -> tuple[int, int, int]:  # used at once, in this iteration
                m = s.matched(ids)
                return m, -(s.row.offset - m) if m else 0, -s.last_used

            slot = max(free, key=rank)
            reuse = slot.matched(ids)
            slot.row.trim(reuse)
            seq.cached = reuse
            seq.pending = seq.prompt[reuse:]
            slot.seq, seq.slot = seq, slot.index
            slot.last_used = next(self._clock)
            if reuse:
                self.metrics.prefix_hits.inc()
        self._update_gauges()

    def _schedule(self) -> Turn:
        """This turn: the slot that prefills a chunk (the oldest request's), and the rows that decode."""
        prefilling = [s.seq for s in self.slots if s.seq is not None and s.seq.pending]
        prefill = min(prefilling, key=lambda q: q.arrived) if prefilling else None
        chunk = tuple(prefill.pending[:self.config.prefill_chunk]) if prefill is not None else ()
        decode = [s.seq for s in self.slots if s.seq is not None and not s.seq.pending]
        if prefill is not None and len(chunk) == len(prefill.pending) and prefill.max_tokens > 1:
            decode.append(prefill)  # its first token comes out of the prefill; it joins this turn's decode pass
        if not decode:
            return Turn(prefill, chunk, 0, (), ())
        by_slot = {self._slot(q).index: q for q in decode}
        start, stop = min(by_slot), max(by_slot) + 1
        # Every row of the pass is as wide as its widest (padding is computed in the matmuls), so
        # with several rows each verifies fewer guesses, and decode_step keeps them only where they
        # pay for every row's extra ids (speculative_proposers.pass_width). A draft model proposes
        # only for a request decoding alone: its one cache would be re-synced to each row in turn.
        cap = 0
        if self.speculative is not None and (self.speculative.draft is None or len(decode) == 1):
            cap = max(BATCH_IDS // (stop - start) - 1, 1)
        rows = tuple(by_slot.get(i) for i in range(start, stop))
        limits = tuple(0 if q is None else self._guess_limit(q, cap, len(chunk) if q is prefill else None)
                       for q in rows)
        return Turn(prefill, chunk, start, rows, limits)

    def _slot(self, seq: ActiveRequest) -> Slot:
        """The slot a scheduled request holds."""
        assert seq.slot is not None, "the request holds no slot"
        return self.slots[seq.slot]

    def _guess_limit(self, seq: ActiveRequest, cap: int, prefilled: int | None) -> int:
        """Guesses a decoding row may add: guesses + the next token must fit the row, leaving its last
        position free (the padding id of a one-id row). `prefilled`: the chunk a request joining from its
        prefill feeds first (its first token then is out)."""
        offset, generated = self._slot(seq).row.offset, seq.generated
        if prefilled is not None:
            offset, generated = offset + prefilled, 1
        return min(cap, seq.max_tokens - generated - 1, self.max_length - 2 - offset)

    def _execute(self, turn: Turn) -> list[Emitted]:
        """Run the turn on the model (no request state changes but the rows' runtime state); returns
        what each row chose, in order: the prefill's first token, then each decoding row's tokens."""
        emitted: list[Emitted] = []
        rows = list(turn.rows)
        if turn.prefill is not None:
            first = self._prefill_chunk(turn.prefill, turn.chunk)
            if first is not None:
                emitted.append(first)
                if first.tokens[0] in turn.prefill.eos_ids and turn.prefill in rows:
                    rows[rows.index(turn.prefill)] = None  # it ended on its first token: nothing to decode
        if any(q is not None for q in rows):
            emitted += self._decode_pass(turn.start, rows, turn.limits)
        return emitted

    def _prefill_chunk(self, seq: ActiveRequest, chunk: tuple[int, ...]) -> Emitted | None:
        """Feed one chunk of the prompt; after the last one, the first token (None before it)."""
        row = self._slot(seq).row
        ids = np.asarray(chunk, dtype=np.int64)[None, :]  # (1, chunk)
        logits = self.model.forward(ids, row)  # (1, 1, vocab); the row records the chunk
        if len(chunk) < len(seq.pending):
            return None
        seq.decoding = Decoding(self.model, seq.prompt, seq.sampler, row, self.speculative, self.draft_cache,
                                matcher=seq.matcher)
        return Emitted(seq, (seq.decoding.first(logits[0, -1]),))

    def _decode_pass(self, start: int, rows: list[ActiveRequest | None], limits: tuple[int, ...]) -> list[Emitted]:
        """One batched pass over rows start.. of the cache: each feeds its next token and, when
        speculating, its guesses; every request verifies them with its own sampler."""
        stop = start + len(rows)
        view = self._views.get((start, stop))
        if view is None:
            view = self._views[(start, stop)] = self.cache.rows(start, stop)
        decodings = [q.decoding if q is not None else None for q in rows]
        before = [(d.stats.proposed, d.stats.accepted) if d is not None else (0, 0) for d in decodings]
        tokens = decode_step(self.model, view, decodings, list(limits))
        return [Emitted(q, tuple(t), d.stats.proposed - p, d.stats.accepted - a)
                for q, d, t, (p, a) in zip(rows, decodings, tokens, before) if q is not None and d is not None]

    def _update(self, turn: Turn, emitted: list[Emitted]) -> None:
        """Apply the turn: the prefill's prompt advances; each row's tokens are taken in order until its
        request ends (tokens after that are dropped: a stop string or the grammar ended it)."""
        if turn.prefill is not None:
            turn.prefill.pending = turn.prefill.pending[len(turn.chunk):]
        for e in emitted:
            if e.seq.done:
                continue
            if self.speculative is not None and e.proposed:
                self.metrics.speculated(e.proposed, e.accepted)
            for token in e.tokens:
                if self._take(e.seq, token):
                    break

    def _take(self, seq: ActiveRequest, token: int) -> bool:
        """Record a chosen token: emit its text, end the sequence if it is done (returns True then)."""
        previous = seq.last_at
        text, reason = seq.accept(token)
        assert seq.first_at is not None and seq.last_at is not None  # accept stamps both
        if previous is None:
            self.metrics.ttft.observe(seq.first_at - seq.arrived)
        else:
            self.metrics.inter_token.observe(seq.last_at - previous)
        if text:
            self._send(seq, Delta(text))
        if reason is not None:
            self._finish(seq, seq.finished(reason.value))
            return True
        return False

    def _finish(self, seq: ActiveRequest, event) -> None:
        """Free the slot (its KV stays as a cached prefix), meter and log, then send the final event."""
        if seq.done:
            return
        seq.done = True
        if seq.slot is not None:
            slot = self.slots[seq.slot]
            slot.seq = None
            if slot.row.offset >= self.max_length:  # keep room for the dummy decode write
                slot.row.trim(self.max_length - 1)
        self.metrics.finished(seq, event)  # metered and logged before the client hears it has ended
        self._update_gauges()
        u = seq.usage()
        reason = getattr(event, "finish_reason", None) or f"error {event.status}"
        rate = getattr(event, "decode_tokens_per_s", 0.0)
        ttft = (seq.first_at - seq.arrived) * 1000 if seq.first_at else float("nan")
        log.info("request %s: prompt %d tokens (%d cached), completion %d, finish %s, "
                 "first token %.0f ms, decode %.1f tok/s", seq.request.request_id or "-", u.prompt_tokens,
                 u.cached_tokens, u.completion_tokens, reason, ttft, rate)
        self._send(seq, event)

    def _send(self, seq: ActiveRequest, event) -> None:
        try:
            seq.emit(event)
        except Exception:  # the receiving side is gone (event loop closed); nothing to tell
            log.debug("dropped an event for request %s", seq.request.request_id, exc_info=True)

    def _update_gauges(self) -> None:
        busy = [s for s in self.slots if s.seq is not None]
        self.metrics.active_slots.set(len(busy))
        self.metrics.queue_depth.set(len(self._waiting))
        capacity = len(self.slots) * self.max_length
        self.metrics.kv_used.labels("active").set(sum(s.row.offset for s in busy) / capacity)
        self.metrics.kv_used.labels("cached").set(sum(s.row.offset for s in self.slots) / capacity)
