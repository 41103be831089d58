"""A GGUF file as an export source: transformers-style config and a WeightSource.

Quantized Q4_0 / Q4_1 / Q8_0 weights keep their blocks, so quantize.rewrite can
place them into MatMulNBits without dequantizing and re-rounding.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np

from edge_infer.export.gguf_file import GGUFTensor, gguf_to_hf, read_gguf


class GGUFWeights:
    def __init__(self, tensors: dict[str, GGUFTensor | np.ndarray]):
        self._tensors = tensors

    def names(self) -> set[str]:
        return set(self._tensors)

    def get(self, name: str) -> np.ndarray:
        t = self._tensors[name]  # a GGUFTensor or a view of one (gguf_arch: Shifted, _Concat)
        if not hasattr(t, "dequantize"):
            return np.asarray(t, dtype=np.float32)
        out = t.dequantize()
        _release(t)
        return out

    def get_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows start:stop of `get(name)`, dequantizing only those (a GGUF tensor read as it is);
        other entries (views with a transform) are read whole and sliced."""
        t = self._tensors[name]
        if not isinstance(t, GGUFTensor):
            return self.get(name)[start:stop]
        out = t.dequantize_rows(start, stop)
        _release(t)
        return out

    def source_type(self, name: str) -> str:
        """The ggml type of a weight ("Q4_K"; "Q4_K+Q6_K" when stacked from several tensors)."""
        t = self._tensors[name]
        parts = getattr(t, "parts", None) or (getattr(t, "tensor", t),)
        return "+".join(sorted({getattr(p, "ggml_type", "F32") for p in parts}))

    def blocks(self, name: str):
        t = self._tensors[name]
        if not (hasattr(t, "blocks") and len(t.shape) == 2):
            return None
        out = t.blocks()
        _release(t)
        return out

    def shape(self, name: str) -> tuple[int, ...]:
        t = self._tensors[name]
        return tuple(t.shape) if hasattr(t, "shape") else np.shape(t)


def _release(t) -> None:
    """Unmap the file's pages once a tensor is read (they stay in the page cache): touched pages of
    a map count in the process's RSS, so a big file read tensor by tensor would end up resident.
    `t` is a GGUFTensor or a view of some (gguf_arch: Shifted, _Concat)."""
    for part in getattr(t, "parts", None) or (getattr(t, "tensor", t),):
        m = getattr(getattr(part, "raw", None), "_mmap", None)
        if m is not None and hasattr(mmap, "MADV_DONTNEED"):
            m.madvise(mmap.MADV_DONTNEED)


def gguf_source(path: Path) -> tuple[dict, GGUFWeights, dict]:
    """(config, weights, metadata) of a GGUF file, every header field checked first."""
    g = read_gguf(path)
    config, tensors, _ = gguf_to_hf(g)
    return config, GGUFWeights(tensors), g.metadata
