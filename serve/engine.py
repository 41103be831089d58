"""The continuous-batching engine: one scheduler thread owns the model.

Each turn of the loop has three steps (as in vLLM's v1 engine):

  schedule  under the lock: drop cancelled requests, move waiting requests
            into free slots (longest cached prefix first, else least recently
            used), pick the one slot that prefills this turn and the slots
            that decode;
  execute   outside the lock: at most one prefill chunk (batch 1, on the
            slot's row of the shared KV cache), then one batched decode step
            over the smallest range of rows that holds every decoding slot;
  update    sample each row with its request's own sampler, detokenize,
            match stops, emit text, free the slots of finished requests.

A long prompt is prefilled one chunk per turn, so the other streams wait at
most one chunk for their next token. With speculation on, a turn in which a
single request decodes verifies that request's guesses (prompt lookup or a
draft model) in one pass on its row instead (runtime/speculative.py: same
output, several tokens per pass); with two or more, the batched step runs. Slots keep their KV after a request ends:
that is the prefix cache. A free slot's row inside the decode range gets a
dummy token written just past its cached positions, where nothing reads it.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time

import numpy as np

from edge_infer.runtime.constrain import MaskPool, constrain_guesses, mask_rows
from edge_infer.runtime.errors import UserError, is_interrupt
from edge_infer.runtime.generate import plan_max_tokens
from edge_infer.runtime.speculative import check_draft, verify
from edge_infer.runtime.speculative_guess import Guesser
from edge_infer.serve.config import EngineConfig
from edge_infer.serve.metrics import Metrics
from edge_infer.serve.sequence import (CANCELLED, Delta, Emit, Failed, GenerationRequest, Handle, Sequence)

log = logging.getLogger("edge_infer.serve")


class QueueFull(UserError):
    """Every slot is busy and the waiting queue is full (HTTP 429)."""


class ShuttingDown(UserError):
    """The server is stopping and takes no new requests (HTTP 503)."""


class Slot:
    """One row of the batched KV cache and the request (if any) using it."""

    def __init__(self, index: int, row):
        self.index = index
        self.row = row  # batch-1 KVCache view: its offset and tokens are this slot's cached prefix
        self.seq: Sequence | None = None
        self.last_used = 0  # LRU clock value when the slot was last given a request

    def matched(self, ids: np.ndarray) -> int:
        """How many leading ids this slot's cache already holds."""
        cached = self.row.tokens
        n = min(len(cached), len(ids))
        if n == 0:
            return 0
        diff = np.flatnonzero(np.asarray(cached[:n], dtype=np.int64) != ids[:n])
        return int(diff[0]) if diff.size else n


class Engine:
    def __init__(self, model, config: EngineConfig = EngineConfig(), metrics: Metrics | None = None):
        config.validate()
        if model.manifest.kv_layout != "shared":
            raise UserError("serving needs a model from the direct graph builder (kv_layout shared); this one was "
                            f"exported through the {model.manifest.raw['graph'].get('route')} route")
        self.model = model
        self.config = config
        self.metrics = metrics or Metrics()
        self.cache = model.new_cache(batch=config.parallel, max_length=config.max_length)
        self.max_length = self.cache.max_length
        for buffer in self.cache.keys + self.cache.values:
            buffer.fill(0)  # commit the KV memory now: RSS stays flat under load, and too big fails at start
        self.slots = [Slot(i, self.cache.row(i)) for i in range(config.parallel)]
        self._views: dict[tuple[int, int], object] = {}  # (start, stop) -> KVCache over those rows
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._cond = threading.Condition()
        self._clock = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stop = False  # set by stop(): end everything and leave the loop
        self._drain_deadline: float | None = None  # set by begin_shutdown(): refuse new, end active at it
        self.metrics.slots_total.set(config.parallel)
        self._masks: MaskPool | None = None  # made at the first constrained request
        self.speculative = config.speculative
        self.draft_cache = None  # one draft cache, synced to whichever request speculates (prefix reuse)
        if self.speculative is not None and self.speculative.draft is not None:
            draft = self.speculative.draft
            check_draft(model, draft)
            self.draft_cache = draft.new_cache(max_length=min(draft.max_length, self.max_length))

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
        seq = Sequence(request, max_tokens, emit, handle, self.model.tokenizer.backend, self.model.tokenizer.eos_ids)
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

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # -- the scheduler thread ----------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._reap()
                if self._stop and not self._busy():
                    return
                self._admit()
                if not self._busy():
                    self._cond.wait(timeout=0.5 if self._drain_deadline is not None else None)
                    continue
                prefill, decode = self._schedule()
            try:
                self._execute(prefill, decode)
            except BaseException as e:  # a failed run (even a library panic, a BaseException) must not take the
                if is_interrupt(e):  # server down: fail its requests, keep scheduling the others
                    raise
                log.error("model step failed: %s: %s", type(e).__name__, e, exc_info=not isinstance(e, UserError))
                for seq in ([prefill] if prefill else []) + decode:
                    for slot in self.slots:
                        if slot.seq is seq:
                            slot.row.trim(0)  # its cached KV can no longer be trusted
                    self._finish(seq, Failed("internal error while generating", 500, "internal_error"))

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
            def rank(s: Slot) -> tuple[int, int, int]:
                m = s.matched(ids)
                return m, -(s.row.offset - m) if m else 0, -s.last_used

            slot = max(free, key=rank)
            reuse = min(slot.matched(ids), len(seq.prompt) - 1)  # one token must run to give logits
            slot.row.trim(reuse)
            seq.cached = reuse
            seq.pending = seq.prompt[reuse:]
            slot.seq = seq
            slot.last_used = next(self._clock)
            if reuse:
                self.metrics.prefix_hits.inc()
        self._update_gauges()

    def _schedule(self) -> tuple[Sequence | None, list[Sequence]]:
        """The slot that prefills a chunk this turn (the oldest), and those that decode."""
        prefilling = [s.seq for s in self.slots if s.seq is not None and s.seq.pending]
        prefill = min(prefilling, key=lambda q: q.arrived) if prefilling else None
        decode = [s.seq for s in self.slots if s.seq is not None and not s.seq.pending]
        return prefill, decode

    def _execute(self, prefill: Sequence | None, decode: list[Sequence]) -> None:
        if prefill is not None:
            self._prefill_chunk(prefill)
            if not prefill.pending and not prefill.done:
                decode.append(prefill)  # its first token is out; it joins this turn's decode step
        decode = [q for q in decode if not q.done]
        if len(decode) == 1 and self.speculative is not None:
            self._speculate(decode[0])
        elif decode:
            self._decode_step(decode)

    def _speculate(self, seq: Sequence) -> None:
        """One pass on seq's own row over its next token and its guesses (none: a plain step, timed
        for the guesser's cost model, as in runtime.speculative.speculative_step)."""
        row = self._slot_of(seq).row
        # Guesses + the next token must fit the row, leaving the last position for the dummy decode write.
        limit = min(seq.max_tokens - seq.generated - 1, self.max_length - 2 - row.offset)
        config = self.speculative
        if seq.guesser is None:
            seq.guesser = Guesser(self.model, seq.sampler, seq.prompt, config.max_guesses,
                                  use_lookup=config.mode == "lookup" or config.use_lookup, draft=config.draft,
                                  draft_cache=self.draft_cache, draft_cost=config.draft_cost)
        guesses, qs = seq.guesser.propose(seq.context, limit) if limit > 0 else ([], None)
        if seq.matcher is not None:  # only guesses the grammar accepts are verified, against masked rows
            guesses, qs, masks = constrain_guesses(seq.matcher, guesses, qs)
        start = row.offset
        x = np.array([[seq.next_token] + guesses], dtype=np.int64)  # (1, k + 1)
        clock = time.perf_counter()
        rows = self.model.forward(x, row, logits_to_keep=len(guesses) + 1)[0]  # (k + 1, vocab)
        seq.guesser.costs.target_pass(len(guesses) + 1, time.perf_counter() - clock)
        if seq.matcher is not None:
            rows = mask_rows(rows, masks)
        accepted, nxt = verify(rows, guesses, qs, seq.context, seq.n_prompt, seq.sampler)
        row.trim(start + 1 + accepted)  # keep the fed token and the accepted guesses
        emitted = guesses[:accepted] + [nxt]
        seq.guesser.record(guesses, accepted, emitted)
        self.metrics.speculated(len(guesses), accepted)
        for token in emitted:
            if self._take(seq, token):
                break

    def _slot_of(self, seq: Sequence) -> Slot:
        return next(s for s in self.slots if s.seq is seq)

    def _prefill_chunk(self, seq: Sequence) -> None:
        slot = self._slot_of(seq)
        chunk, seq.pending = seq.pending[:self.config.prefill_chunk], seq.pending[self.config.prefill_chunk:]
        ids = np.asarray(chunk, dtype=np.int64)[None, :]  # (1, chunk)
        logits = self.model.forward(ids, slot.row)  # (1, 1, vocab); appends the chunk to row.tokens
        if not seq.pending:
            self._update(seq, logits[0, -1])

    def _decode_step(self, decode: list[Sequence]) -> None:
        rows = {self._slot_of(q).index: q for q in decode}
        start, stop = min(rows), max(rows) + 1
        tokens = np.zeros(stop - start, dtype=np.int64)  # (batch,)
        lengths = np.zeros(stop - start, dtype=np.int64)  # (batch,)
        for i, slot in enumerate(self.slots[start:stop]):
            seq = rows.get(slot.index)
            # A row not decoding gets a dummy token just past its cached prefix: nothing reads it,
            # and the next prefill chunk (or request) overwrites it.
            lengths[i] = slot.row.offset
            tokens[i] = seq.next_token if seq is not None else 0
        view = self._views.get((start, stop))
        if view is None:
            view = self._views[(start, stop)] = self.cache.rows(start, stop)
        # Grammar masks for the constrained rows, computed on a helper thread while the model runs.
        constrained = [q for q in decode if q.matcher is not None and getattr(q.matcher, "active", True)]
        if constrained and self._masks is None:
            self._masks = MaskPool()
        pending = self._masks.submit([q.matcher for q in constrained]) if constrained else None
        logits = self.model.decode_batch(tokens, view, lengths)  # (batch, vocab)
        masks = dict(zip(map(id, constrained), pending.result())) if pending else {}  # id(seq) -> (words,)
        for i, slot in enumerate(self.slots[start:stop]):
            seq = rows.get(slot.index)
            if seq is not None:
                slot.row.offset += 1
                slot.row.tokens.append(seq.next_token)
                self._update(seq, logits[i], masks.get(id(seq)))

    def _update(self, seq: Sequence, logits: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Sample the next token from logits (vocab,), emit its text, end the sequence if it is done."""
        self._take(seq, seq.sample(logits, mask))

    def _take(self, seq: Sequence, token: int) -> bool:
        """Record a chosen token: emit its text, end the sequence if it is done (returns True then)."""
        previous = seq.last_at
        text, reason = seq.accept(token)
        if previous is None:
            self.metrics.ttft.observe(seq.first_at - seq.arrived)
        else:
            self.metrics.inter_token.observe(seq.last_at - previous)
        if text:
            self._send(seq, Delta(text))
        if reason is not None:
            self._finish(seq, seq.finished(reason.value))
            return True
        seq.next_token = token
        return False

    def _finish(self, seq: Sequence, event) -> None:
        """Free the slot (its KV stays as a cached prefix), meter and log, then send the final event."""
        if seq.done:
            return
        seq.done = True
        for slot in self.slots:
            if slot.seq is seq:
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

    def _send(self, seq: Sequence, event) -> None:
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
