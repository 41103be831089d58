"""The KV cache: one preallocated buffer per layer, shared by the graph's past and present.

The caller creates it and passes it in. `offset` is how many positions hold
keys and values; `trim(n)` forgets everything after position n (prefix reuse,
speculative rollback): stale entries past the offset are overwritten by the
next forward pass because attention only reads the first `offset` positions.
"""

from __future__ import annotations

import numpy as np
from edge_infer.devices.ort import ort

from edge_infer.runtime.errors import ContextLengthError
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
        self._allocate(g, np.float16 if manifest.dtype == "fp16" else np.float32)

    def _allocate(self, g, dtype) -> None:
        shape = (self.batch, g.num_kv_heads, self.max_length, g.head_dim)  # (batch, kv_heads, max_length, head_dim)
        self._attach([np.zeros(shape, dtype) for _ in range(g.num_layers)],
                     [np.zeros(shape, dtype) for _ in range(g.num_layers)])

    def _attach(self, keys: list[np.ndarray], values: list[np.ndarray]) -> None:
        self.keys, self.values = keys, values
        # Zero-copy views handed to onnxruntime: the graph reads and writes these arrays in place.
        self.key_values = [ort.OrtValue.ortvalue_from_numpy(a) for a in keys]
        self.value_values = [ort.OrtValue.ortvalue_from_numpy(a) for a in values]
        self.offset = 0
        self.tokens: list[int] = []  # the ids whose keys are stored, for prefix reuse
        self.bindings: dict[int, object] = {}  # session id -> IOBinding with these buffers bound (runtime.model)

    def row(self, r: int) -> "KVCache":
        """A batch-1 cache over row r of this one, sharing its memory (a slot for continuous batching).

        The row's offset and tokens are its own; a batched decode over the parent
        reads each row up to the length the caller passes.
        """
        if not 0 <= r < self.batch:
            raise IndexError(f"row {r} of a cache with batch {self.batch}")
        view = object.__new__(KVCache)
        view.max_length, view.batch = self.max_length, 1
        view._attach([k[r:r + 1] for k in self.keys], [v[r:r + 1] for v in self.values])  # contiguous rows
        return view

    def rows(self, start: int, stop: int) -> "KVCache":
        """A batch-(stop - start) cache over rows start..stop-1, sharing this one's memory.

        For a batched decode over only the slots in use: a step's cost grows with
        its batch, so the server decodes the smallest range of rows that holds
        every active slot. The view's offset and tokens are unused (decode_batch
        takes the lengths from the caller).
        """
        if not 0 <= start < stop <= self.batch:
            raise IndexError(f"rows {start}..{stop - 1} of a cache with batch {self.batch}")
        view = object.__new__(KVCache)
        view.max_length, view.batch = self.max_length, stop - start
        view._attach([k[start:stop] for k in self.keys], [v[start:stop] for v in self.values])  # contiguous
        return view

    @property
    def free(self) -> int:
        return self.max_length - self.offset

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.keys) + sum(a.nbytes for a in self.values)

    def trim(self, n: int) -> None:
        """Keep the first n positions."""
        if not 0 <= n <= self.offset:
            raise ValueError(f"cannot trim a cache of {self.offset} positions to {n}")
        self.offset = n
        del self.tokens[n:]

    def reset(self) -> None:
        self.trim(0)

    def common_prefix(self, ids: list[int]) -> int:
        """How many leading ids are already cached."""
        n = 0
        for a, b in zip(self.tokens, ids):
            if a != b:
                break
            n += 1
        return n


class ConcatKVCache(KVCache):
    """The cache of a graph that returns past + new keys as new tensors (the optimum route).

    Each pass hands back longer arrays; trimming slices them. Slower than the shared
    buffer (a copy per step), kept for architectures without a fused builder.
    """

    def _allocate(self, g, dtype) -> None:
        shape = (self.batch, g.num_kv_heads, 0, g.head_dim)  # (batch, kv_heads, past_sequence_length, head_dim)
        self.keys = [np.zeros(shape, dtype) for _ in range(g.num_layers)]
        self.values = [np.zeros(shape, dtype) for _ in range(g.num_layers)]
        self.offset = 0
        self.tokens = []
        self.bindings = {}

    def trim(self, n: int) -> None:
        super().trim(n)
        self.keys = [k[:, :, :n] for k in self.keys]
        self.values = [v[:, :, :n] for v in self.values]

    def row(self, r: int) -> "KVCache":
        raise NotImplementedError("batched slots need a model exported by the direct builder (kv_layout shared)")
