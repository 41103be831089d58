"""A GGUF file as an export source: transformers-style config and a WeightSource.

Quantized Q4_0 / Q4_1 / Q8_0 weights keep their blocks, so quantize.rewrite can
place them into MatMulNBits without dequantizing and re-rounding.
"""

from __future__ import annotations

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
        return t.dequantize() if hasattr(t, "dequantize") else np.asarray(t, dtype=np.float32)

    def source_type(self, name: str) -> str:
        """The ggml type of a weight ("Q4_K"; "Q4_K+Q6_K" when stacked from several tensors)."""
        t = self._tensors[name]
        parts = getattr(t, "parts", None) or (getattr(t, "tensor", t),)
        return "+".join(sorted({getattr(p, "ggml_type", "F32") for p in parts}))

    def blocks(self, name: str):
        t = self._tensors[name]
        return t.blocks() if hasattr(t, "blocks") and len(t.shape) == 2 else None


def gguf_source(path: Path) -> tuple[dict, GGUFWeights, dict]:
    """(config, weights, metadata) of a GGUF file, every header field checked first."""
    g = read_gguf(path)
    config, tensors, _ = gguf_to_hf(g)
    return config, GGUFWeights(tensors), g.metadata
