"""The KV cache: one preallocated buffer per layer, shared by the graph's past and present.

The caller creates it and passes it in; it owns its bookkeeping. `offset` is how
many positions hold keys and values (read it, do not set it): `advance(ids)`
records ids a pass has written, `trim(n)` forgets everything after position n
(prefix reuse, speculative rollback). Stale entries past the offset are
overwritten by the next forward pass because attention only reads the first
`offset` positions. `binding(session, ...)` is the IOBinding with the buffers
bound as both past and present, made once per session.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from edge_infer.devices.ort import ort

from edge_infer.contract.errors import ContextLengthError
from edge_infer.runtime.manifest import Manifest
from edge_infer.runtime.manifest_schema import check_kv_memory


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
    def _over(cls, max_length: int, keys: list[np.ndarray], values: list[np.ndarray]) -> "KVCache":
        """A cache over existing buffers (a view of another cache's rows)."""
        view = cls.__new__(cls)
        view.max_length, view.batch = max_length, keys[0].shape[0]
        view._attach(keys, values)
        return view

    def _allocate(self, g, dtype, width: int) -> None:
        # (batch, kv_heads, max_length, head_dim); an int4 cache packs two values per byte (head_dim / 2).
        shape = (self.batch, g.num_kv_heads, self.max_length, width)
        self._attach([np.zeros(shape, dtype) for _ in range(g.num_layers)],
                     [np.zeros(shape, dtype) for _ in range(g.num_layers)])

    def _attach(self, keys: list[np.ndarray], values: list[np.ndarray]) -> None:
        self.keys, self.values = keys, values
        # Zero-copy views handed to onnxruntime: the graph reads and writes these arrays in place.
        self.key_values = [ort.OrtValue.ortvalue_from_numpy(a) for a in keys]
        self.value_values = [ort.OrtValue.ortvalue_from_numpy(a) for a in values]
        self._offset = 0
        self.tokens: list[int] = []  # the ids whose keys are stored, for prefix reuse (batch-1 caches)
        self._bindings: dict[int, ort.IOBinding] = {}  # id(session) -> IOBinding with these buffers bound

    @property
    def offset(self) -> int:
        return self._offset

    def row(self, r: int) -> "KVCache":
        """A batch-1 cache over row r of this one, sharing its memory (a slot for continuous batching).

        The row's offset and tokens are its own; a batched pass over the parent
        reads each row up to the length the caller passes.
        """
        if not 0 <= r < self.batch:
            raise IndexError(f"row {r} of a cache with batch {self.batch}")
        return self.rows(r, r + 1)

    def rows(self, start: int, stop: int) -> "KVCache":
        """A batch-(stop - start) cache over rows start..stop-1, sharing this one's memory.

        For a batched pass over only the slots in use: a step's cost grows with
        its batch, so the server runs the smallest range of rows that holds
        every active slot. The view's own offset and tokens are unused (the
        batched pass takes the lengths from the caller).
        """
        if not 0 <= start < stop <= self.batch:
            raise IndexError(f"rows {start}..{stop - 1} of a cache with batch {self.batch}")
        # Slicing the first axis keeps each row contiguous.
        return type(self)._over(self.max_length, [k[start:stop] for k in self.keys],
                                [v[start:stop] for v in self.values])

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

    def advance(self, ids: Sequence[int]) -> None:
        """Record that a pass wrote keys and values for `ids` after the cached positions."""
        n = len(ids)
        if self._offset + n > self.max_length:
            raise ContextLengthError(f"{self._offset + n} positions do not fit the KV cache of {self.max_length}")
        self._offset += n
        if self.batch == 1:
            self.tokens.extend(int(t) for t in ids)

    def trim(self, n: int) -> None:
        """Keep the first n positions."""
        if not 0 <= n <= self.offset:
            raise ValueError(f"cannot trim a cache of {self.offset} positions to {n}")
        self._offset = n
        del self.tokens[n:]

    def reset(self) -> None:
        self.trim(0)

    def common_prefix(self, ids: Sequence[int]) -> int:
        """How many leading ids are already cached."""
        n = 0
        for a, b in zip(self.tokens, ids):
            if a != b:
                break
            n += 1
        return n

    def reuse(self, ids: Sequence[int]) -> int:
        """Trim to the longest cached prefix of ids that leaves at least one id to run (a pass must
        run to give logits); returns how many ids are reused."""
        n = min(self.common_prefix(ids), len(ids) - 1)
        self.trim(n)
        return n


class ConcatKVCache(KVCache):
    """The cache of a graph that returns past + new keys as new tensors (the optimum route).

    Each pass hands back longer arrays; trimming slices them. Slower than the shared
    buffer (a copy per step), kept for architectures without a fused builder.
    """

    def _allocate(self, g, dtype, width: int) -> None:
        shape = (self.batch, g.num_kv_heads, 0, width)  # (batch, kv_heads, past_sequence_length, head_dim)
        self.keys = [np.zeros(shape, dtype) for _ in range(g.num_layers)]
        self.values = [np.zeros(shape, dtype) for _ in range(g.num_layers)]
        self._offset = 0
        self.tokens = []
        self._bindings = {}

    def replace(self, keys: list[np.ndarray], values: list[np.ndarray]) -> None:
        """Take the past + new arrays a pass returned."""
        self.keys, self.values = keys, values

    def advance(self, ids: Sequence[int]) -> None:
        """The pass already returned past + new arrays; keep only what is recorded (a speculative
        round keeps the fed token and its accepted guesses)."""
        super().advance(ids)
        self.keys = [k[:, :, :self._offset] for k in self.keys]
        self.values = [v[:, :, :self._offset] for v in self.values]

    def trim(self, n: int) -> None:
        super().trim(n)
        self.keys = [k[:, :, :n] for k in self.keys]
        self.values = [v[:, :, :n] for v in self.values]

    def rows(self, start: int, stop: int) -> "KVCache":
        raise NotImplementedError("batched slots need a model exported by the direct builder (kv_layout shared)")
