"""The KV cache: one preallocated buffer per layer, shared by the graph's past and present.

The caller creates it and passes it in. `offset` is how many positions hold
keys and values; `trim(n)` forgets everything after position n (prefix reuse,
speculative rollback): stale entries past the offset are overwritten by the
next forward pass because attention only reads the first `offset` positions.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from edge_infer.runtime.errors import ContextLengthError
from edge_infer.runtime.manifest import Manifest


class KVCache:
    def __init__(self, manifest: Manifest, batch: int = 1, max_length: int | None = None):
        g = manifest.geometry
        self.max_length = int(max_length or g.max_length)
        if not 0 < self.max_length <= g.max_length:
            raise ContextLengthError(
                f"cache length {self.max_length} must be between 1 and the exported max_length {g.max_length}"
            )
        self.batch = batch
        dtype = np.float16 if manifest.dtype == "fp16" else np.float32
        shape = (batch, g.num_kv_heads, self.max_length, g.head_dim)  # (batch, kv_heads, max_length, head_dim)
        self.keys = [np.zeros(shape, dtype) for _ in range(g.num_layers)]
        self.values = [np.zeros(shape, dtype) for _ in range(g.num_layers)]
        # Zero-copy views handed to onnxruntime: the graph reads and writes these arrays in place.
        self.key_values = [ort.OrtValue.ortvalue_from_numpy(a) for a in self.keys]
        self.value_values = [ort.OrtValue.ortvalue_from_numpy(a) for a in self.values]
        self.offset = 0
        self.tokens: list[int] = []  # the ids whose keys are stored, for prefix reuse

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
