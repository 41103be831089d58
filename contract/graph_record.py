"""The manifest's `graph` record, typed: written once at export, read back by the runtime.

    {"file": "model.onnx", "data_file": "model.onnx.data", "inputs": [...], "outputs": [...],
     "dtype": "fp32", "kv_cache": "...", "ops": "...", "route": "direct", "kv_layout": "shared",
     "attention_padding": "in-graph", "genai": "...",
     "headers": [{"file": "model.onnx", "needs": [...]}, {"file": "model.compat.onnx", ...}]}
                                                                     <- GraphRecord.to_manifest()

Export builds one `GraphRecord` (dataclasses.replace for what a route adds) and the runtime reads
the same fields back (`Manifest.graph`), as `QuantRecord` does for the quantization section.
Adding a field is one line in the class: `to_manifest` and `from_manifest` walk the fields, a
field left at None is not written, and JSON lists read back as tuples. Keys this edge-infer does
not know are kept in `extra` and written back as they were read.

`kv_cache_bytes` is the KV cache's size, the one formula export's note and the runtime's memory
check both use.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np


@dataclass(frozen=True)
class GraphHeader:
    """One graph header over the model's weights (graph.headers, export/graph_headers.py) and the
    optional GroupQueryAttention inputs it feeds, which the installed onnxruntime must know to load it
    (devices/capabilities.py)."""

    file: str
    needs: tuple[str, ...] = ()

    def record(self) -> dict[str, Any]:
        return {"file": self.file, "needs": list(self.needs)}

    @classmethod
    def from_manifest(cls, raw: Mapping[str, Any]) -> GraphHeader:
        return cls(str(raw["file"]), tuple(raw.get("needs", ())))


@dataclass(frozen=True)
class GraphRecord:
    """The manifest's `graph` section."""

    file: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dtype: str = "fp32"  # weights and activations: fp32 | fp16
    data_file: str | None = None
    kv_cache: str | None = None  # how the cache is held, for people
    ops: str | None = None  # which operators the graph uses, for people
    route: str | None = None  # "direct" (our builder) | "optimum"
    kv_layout: str | None = None  # "shared" | "concat" | "static"; None: written before the field, "shared"
    attention_padding: str | None = None  # "in-graph": one-token passes run attention as two tokens
    genai: str | None = None  # whether onnxruntime-genai files were written, for people
    profile: str | None = None  # "npu": static standard-op graphs; "gpu": fp16 activations and KV cache
    target: str | None = None  # the devices a profile is for, for people
    static_plan: Mapping[str, Any] | None = None  # the npu profile's two graphs (runtime/static_plan.py)
    # graph headers over the same weights, best first; the runtime loads the first the installed onnxruntime
    # can (the full graph, then model.compat.onnx without query_seqlens); None: `file` alone
    headers: tuple[GraphHeader, ...] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # keys not named above, kept as read

    def to_manifest(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(GraphRecord):
            value = getattr(self, f.name)
            if f.name == "headers" and value is not None:
                out[f.name] = [h.record() for h in value]
            elif f.name != "extra" and value is not None:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        clash = set(out) & set(self.extra)
        assert not clash, f"graph extra keys may not overwrite {sorted(clash)}"
        return {**out, **self.extra}

    @classmethod
    def from_manifest(cls, raw: Mapping[str, Any]) -> GraphRecord:
        """The section as written by any edge-infer (checked first by runtime/manifest_schema.py)."""
        known = {f.name for f in fields(GraphRecord)} - {"extra"}
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in known}
        if values.get("headers") is not None:
            values["headers"] = tuple(GraphHeader.from_manifest(h) for h in values["headers"])
        return cls(**values, extra={k: v for k, v in raw.items() if k not in known})


# How the KV cache stores a head's values at one position: (numpy dtype, values stored), by cache dtype.
# int4 packs two values a byte.
_KV_STORAGE = {"fp32": (np.float32, 1.0), "fp16": (np.float16, 1.0), "int8": (np.int8, 1.0), "int4": (np.uint8, 0.5)}


def kv_storage(kv_dtype: str, head_dim: int) -> tuple[np.dtype, int]:
    """(numpy dtype, values per head stored per position) of the cache buffers for `kv_dtype`
    ("fp32" | "fp16" | "int8" | "int4")."""
    dtype, per = _KV_STORAGE[kv_dtype]
    return np.dtype(dtype), int(head_dim * per)


def kv_cache_bytes(kv_dtype: str, num_layers: int, num_kv_heads: int, head_dim: int, max_length: int,
                   batch: int = 1) -> int:
    """Bytes of the keys and values of `batch` sequences of `max_length` positions."""
    dtype, width = kv_storage(kv_dtype, head_dim)
    return 2 * num_layers * batch * num_kv_heads * max_length * width * dtype.itemsize
