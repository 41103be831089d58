"""The KV cache: one preallocated buffer per layer, shared by the graph's past and present.

The caller creates it and passes it in; it owns its bookkeeping, as mlx-lm's cache owns its
offset. Each row's length (how many positions hold keys and values) and, for prefix reuse,
the ids whose keys are stored, live here and nowhere else: `advance_rows` records what a pass
wrote (called by Model.forward_rows only, the one place a cache advances), `trim(n)` forgets
everything after position n (prefix reuse, speculative rollback of rejected guesses). Row views (`row`, `rows`) share the parent's buffers,
lengths and ids, so a slot's batch-1 view and a batched view over several slots read and
move the same numbers. `plan(feeds, ...)` builds one pass over the rows: input ids,
attention mask, positions and query_seqlens from the rows' lengths, after checking it
fits (the one place that does). Stale entries past a row's length are overwritten by the
next pass because attention only reads the first `length` positions.
`binding(session, ...)` is the IOBinding with the buffers bound as both past and present,
made once per session.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from edge_infer.devices.ort import ort

from edge_infer.contract.errors import ContextLengthError
from edge_infer.runtime.manifest import Manifest
from edge_infer.runtime.manifest_schema import check_kv_memory


@dataclass(frozen=True)
class Pass:
    """One pass over every row of a cache: the graph's inputs and where each row's logits are.

    Row r feeds `real[r]` ids (then padding ids up to `fed[r]`, the ids its pass writes) at
    positions start[r]...; the graph returns logits for the last `keep` positions of the pass.
    """

    ids: np.ndarray  # (batch, sequence_length) int64, right padding is id 0
    mask: np.ndarray  # (batch, total_sequence_length) int64, right-padded: the positions each row holds after it
    positions: np.ndarray  # (batch, sequence_length) int64
    query_lengths: np.ndarray  # (batch,) int64: ids each row writes (GroupQueryAttention's query_seqlens)
    real: tuple[int, ...]
    want: tuple[int, ...]  # logits rows each row wants (its last `want[r]` real ids)
    keep: int  # logits_to_keep

    def split(self, logits: np.ndarray) -> list[np.ndarray]:
        """Per row, the logits of its last want[r] real ids, (want[r], vocab), from the pass's (batch, keep, vocab)."""
        first = self.ids.shape[1] - self.keep  # the pass position of logits row 0
        return [logits[r, n - w - first:n - first] for r, (n, w) in enumerate(zip(self.real, self.want))]


class KVCache:
    def __init__(self, manifest: Manifest, batch: int = 1, max_length: int | None = None):
        g = manifest.geometry
        self.max_length = int(max_length or g.max_length)
        if not 0 < self.max_length <= g.max_length:
            raise ContextLengthError(
                f"cache length {self.max_length} must be between 1 and the exported max_length {g.max_length}"
            )
        self.batch = batch
        check_kv_memory(manifest.folder, manifest.kv_bytes(batch, self.max_length),
                        f"a KV cache of {batch} x {self.max_length} positions")
        self._allocate(g, *manifest.kv_numpy)

    @classmethod
    def _over(cls, parent: "KVCache", start: int, stop: int) -> "KVCache":
        """A cache over rows start..stop-1 of `parent`: its buffers, lengths and ids (a view)."""
        view = cls.__new__(cls)
        view.max_length, view.batch = parent.max_length, stop - start
        # Slicing the first axis keeps each row contiguous; the lengths slice is a numpy view.
        view._attach([k[start:stop] for k in parent.keys], [v[start:stop] for v in parent.values],
                     parent._lengths[start:stop], parent._ids[start:stop])
        return view

    def _allocate(self, g, dtype, width: int) -> None:
        # (batch, kv_heads, max_length, head_dim); an int4 cache packs two values per byte (head_dim / 2).
        shape = (self.batch, g.num_kv_heads, self.max_length, width)
        self._attach([np.zeros(shape, dtype) for _ in range(g.num_layers)],
                     [np.zeros(shape, dtype) for _ in range(g.num_layers)])

    def _attach(self, keys: list[np.ndarray], values: list[np.ndarray], lengths: np.ndarray | None = None,
                ids: list[list[int]] | None = None) -> None:
        self.keys, self.values = keys, values
        # Zero-copy views handed to onnxruntime: the graph reads and writes these arrays in place.
        self.key_values = [ort.OrtValue.ortvalue_from_numpy(a) for a in keys]
        self.value_values = [ort.OrtValue.ortvalue_from_numpy(a) for a in values]
        self._bookkeeping(lengths, ids)

    def _bookkeeping(self, lengths: np.ndarray | None = None, ids: list[list[int]] | None = None) -> None:
        """Each row's length and stored ids: fresh, or a parent's rows (a view)."""
        self._lengths = lengths if lengths is not None else np.zeros(self.batch, np.int64)  # (batch,)
        self._ids = ids if ids is not None else [[] for _ in range(self.batch)]  # per row: the ids stored
        self._bindings: dict[int, ort.IOBinding] = {}  # id(session) -> IOBinding with these buffers bound

    @property
    def lengths(self) -> np.ndarray:
        """Each row's length, (batch,) (a copy)."""
        return self._lengths.copy()

    @property
    def offset(self) -> int:
        """The length of a batch-1 cache (or of every row, when all rows have one length)."""
        first = int(self._lengths[0])
        if self.batch > 1 and not (self._lengths == first).all():
            raise ValueError(f"the rows of this cache have different lengths {self._lengths.tolist()}")
        return first

    @property
    def tokens(self) -> list[int]:
        """The ids whose keys a batch-1 cache holds (for prefix reuse)."""
        if self.batch != 1:
            raise ValueError("tokens is per row: use row(r).tokens")
        return self._ids[0]

    def row(self, r: int) -> "KVCache":
        """A batch-1 cache over row r of this one, sharing its memory (a slot for continuous batching)."""
        if not 0 <= r < self.batch:
            raise IndexError(f"row {r} of a cache with batch {self.batch}")
        return self.rows(r, r + 1)

    def rows(self, start: int, stop: int) -> "KVCache":
        """A batch-(stop - start) cache over rows start..stop-1, sharing this one's memory and lengths.

        For a batched pass over only the slots in use: a step's cost grows with its batch, so the
        server runs the smallest range of rows that holds every active slot.
        """
        if not 0 <= start < stop <= self.batch:
            raise IndexError(f"rows {start}..{stop - 1} of a cache with batch {self.batch}")
        return type(self)._over(self, start, stop)

    def forget_bindings(self) -> None:
        """Drop every IOBinding of this cache (each holds its session, and the session its weights)."""
        self._bindings.clear()

    def binding(self, session: ort.InferenceSession, make: Callable[[], ort.IOBinding]) -> ort.IOBinding:
        """This cache's IOBinding for `session`, made by `make` (which binds the buffers) the first time."""
        b = self._bindings.get(id(session))
        if b is None:
            b = self._bindings[id(session)] = make()
        return b

    @property
    def free(self) -> int:
        return self.max_length - self.offset

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.keys) + sum(a.nbytes for a in self.values)

    def check_fits(self, ends: np.ndarray) -> None:
        """Refuse rows that would end past the cache (ends: each row's length after a pass)."""
        if ends.size and int(ends.max()) > self.max_length:
            raise ContextLengthError(f"{int(ends.max())} positions do not fit the KV cache of {self.max_length}")

    def advance_rows(self, written: Sequence[Sequence[int]]) -> None:
        """Record per row the ids whose keys a pass wrote after its cached positions (Model.forward_rows)."""
        counts = np.array([len(k) for k in written], dtype=np.int64)
        self.check_fits(self._lengths + counts)
        self._lengths += counts
        for row, ids in zip(self._ids, written):
            row.extend(int(t) for t in ids)

    def trim(self, n: int) -> None:
        """Keep the first n positions of every row."""
        if not 0 <= n <= int(self._lengths.min()):
            raise ValueError(f"cannot trim a cache of {self._lengths.tolist()} positions to {n}")
        self._lengths[:] = n
        for row in self._ids:
            del row[n:]

    def reset(self) -> None:
        self.trim(0)

    def common_prefix(self, ids: Sequence[int]) -> int:
        """How many leading ids a batch-1 cache already holds."""
        return common_prefix(self.tokens, ids)

    def reuse(self, ids: Sequence[int]) -> int:
        """Trim to the longest cached prefix of ids that leaves at least one id to run (a pass must
        run to give logits); returns how many ids are reused."""
        n = reusable(self.tokens, ids)
        self.trim(n)
        return n

    def previous_id(self, r: int = 0) -> int | None:
        """The id row r holds just before its end, when it holds one."""
        at = int(self._lengths[r]) - 1
        return int(self._ids[r][at]) if 0 <= at < len(self._ids[r]) else None

    def plan(self, feeds: Sequence[Sequence[int]], pad: bool, uniform: bool, keep: int | None = None,
             back: int = 0) -> Pass:
        """One pass feeding row r the ids feeds[r] (any number; 0 for an idle row) after its length
        (`back` positions before it: ids that recompute stored positions).

        pad: a row of one id also feeds a padding id after it where it has room. uniform: the graph
        writes sequence_length entries into every row (a header without query_seqlens), so shorter
        rows and idle rows feed padding ids up to the widest; their entries land past the row's
        length, where the next pass overwrites them. keep: logits per row for its last min(keep, n)
        ids (None: all). Raises ContextLengthError when a row's ids do not fit.
        """
        assert len(feeds) == self.batch, "one feed per row"
        starts = self._lengths - back  # (batch,)
        real = [len(f) for f in feeds]
        self.check_fits(starts + np.array(real, dtype=np.int64))
        if uniform:  # every row writes the widest feed (+ a padding id where one id is fed and all have room)
            seq = max(max(real), 1)
            seq += int(pad and seq == 1 and int(starts.max()) + 2 <= self.max_length)
            fed = [seq] * self.batch
            self.check_fits(starts + seq)
        else:
            fed = [n + 1 if pad and n == 1 and starts[r] + 2 <= self.max_length else n for r, n in enumerate(real)]
            seq = max(max(fed), 1)
        ids = np.zeros((self.batch, seq), dtype=np.int64)  # (batch, sequence_length)
        for r, f in enumerate(feeds):
            ids[r, :real[r]] = f
        ends = starts + np.array(fed, dtype=np.int64)
        # Right-padded mask of the positions each row holds after this pass. An idle row (0 ids fed,
        # query_seqlens 0) writes nothing; at length 0 it still shows one position, as the op needs.
        total = max(int(ends.max()), seq)
        mask = (np.arange(total)[None, :] < np.maximum(ends, 1)[:, None]).astype(np.int64)  # (batch, total)
        positions = starts[:, None] + np.arange(seq)[None, :]  # (batch, sequence_length)
        # Logits for the last k positions of the pass: enough to reach the first one any row wants.
        want = [n if keep is None else min(keep, n) for n in real]
        first = min((real[r] - want[r] for r in range(self.batch) if real[r]), default=seq - 1)
        return Pass(ids, mask, positions, np.array(fed, dtype=np.int64), tuple(real), tuple(want), seq - first)

    def fits_uniform(self, feeds: Sequence[Sequence[int]]) -> bool:
        """Whether every row has room for the widest feed (what a header without query_seqlens writes)."""
        return int(self._lengths.max()) + max(max(len(f) for f in feeds), 1) <= self.max_length


def common_prefix(cached: Sequence[int], ids: Sequence[int] | np.ndarray) -> int:
    """How many leading ids of `ids` `cached` holds."""
    n = min(len(cached), len(ids))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(cached[:n], dtype=np.int64) != np.asarray(ids[:n], dtype=np.int64))
    return int(diff[0]) if diff.size else n


def reusable(cached: Sequence[int], ids: Sequence[int] | np.ndarray) -> int:
    """The prefix-reuse rule (generate, the server's slots): the longest cached prefix of `ids` that
    leaves at least one id to run, since a pass must run to give the next logits."""
    return min(common_prefix(cached, ids), len(ids) - 1)


class ConcatKVCache(KVCache):
    """The cache of a graph that returns past + new keys as new tensors (the optimum route).

    Each pass hands back longer arrays; trimming slices them. Slower than the shared
    buffer (a copy per step), kept for architectures without a fused builder.
    """

    def _allocate(self, g, dtype, width: int) -> None:
        shape = (self.batch, g.num_kv_heads, 0, width)  # (batch, kv_heads, past_sequence_length, head_dim)
        self.keys = [np.zeros(shape, dtype) for _ in range(g.num_layers)]
        self.values = [np.zeros(shape, dtype) for _ in range(g.num_layers)]
        self._bookkeeping()

    def replace(self, keys: list[np.ndarray], values: list[np.ndarray]) -> None:
        """Take the past + new arrays a pass returned."""
        self.keys, self.values = keys, values

    def advance_rows(self, written: Sequence[Sequence[int]]) -> None:
        """The pass already returned past + new arrays; keep only what is recorded."""
        super().advance_rows(written)
        self.keys = [k[:, :, :self.offset] for k in self.keys]
        self.values = [v[:, :, :self.offset] for v in self.values]

    def trim(self, n: int) -> None:
        super().trim(n)
        self.keys = [k[:, :, :n] for k in self.keys]
        self.values = [v[:, :, :n] for v in self.values]

    def rows(self, start: int, stop: int) -> "KVCache":
        raise NotImplementedError("batched slots need a model exported by the direct builder (kv_layout shared)")

    def plan(self, feeds: Sequence[Sequence[int]], pad: bool, uniform: bool, keep: int | None = None,
             back: int = 0) -> Pass:
        """A pass of rows of one length (the graph has no per-row lengths): every position attended."""
        assert back == 0 and len({len(f) for f in feeds}) == 1, "rows of one length"
        start, n = self.offset, len(feeds[0])
        self.check_fits(np.array([start + n]))
        ids = np.asarray(feeds, dtype=np.int64).reshape(self.batch, n)  # (batch, n)
        mask = np.ones((self.batch, start + n), dtype=np.int64)  # (batch, total_sequence_length)
        positions = np.arange(start, start + n, dtype=np.int64)[None, :].repeat(self.batch, 0)  # (batch, n)
        want = n if keep is None else min(keep, n)
        return Pass(ids, mask, positions, np.full(self.batch, n, np.int64), (n,) * self.batch,
                    (want,) * self.batch, want)
