"""edge-infer: on-device LLM inference on onnxruntime.

    import edge_infer
    model = edge_infer.load("smollm2-int4")
    for chunk in edge_infer.stream_generate(model, [{"role": "user", "content": "Hi"}], max_tokens=64):
        print(chunk.text, end="")

Loading and generating import onnxruntime, numpy, tokenizers and jinja2 only.

The public names resolve lazily (PEP 562 module `__getattr__`): importing any
`edge_infer.*` module runs this file, and `edge-infer --help`, `export` or
`quantize` must not pay for an onnxruntime session or jinja2 they never use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "load": "edge_infer.runtime.model",
    "Model": "edge_infer.runtime.model",
    "generate": "edge_infer.runtime.generate",
    "stream_generate": "edge_infer.runtime.generate",
    "Chunk": "edge_infer.runtime.generate",
    "FinishReason": "edge_infer.runtime.generate",
    "Timings": "edge_infer.runtime.generate",
    "embed": "edge_infer.runtime.embed",
    "load_embedding": "edge_infer.runtime.embed",
    "EmbeddingModel": "edge_infer.runtime.embed",
    "ChatSession": "edge_infer.runtime.chat",
    "ToolCall": "edge_infer.runtime.tool_replies",
    "SamplingParams": "edge_infer.runtime.sampling",
    "SpeculativeConfig": "edge_infer.runtime.speculative",
    "UserError": "edge_infer.contract.errors",
    "ModelFileError": "edge_infer.contract.errors",
    "ContextLengthError": "edge_infer.contract.errors",
}

__all__ = [*_PUBLIC, "export", "__version__"]

if TYPE_CHECKING:  # for type checkers and editors; at run time names load on first use
    from edge_infer.contract.errors import ContextLengthError, ModelFileError, UserError
    from edge_infer.runtime.chat import ChatSession
    from edge_infer.runtime.embed import EmbeddingModel, embed, load_embedding
    from edge_infer.runtime.generate import Chunk, FinishReason, Timings, generate, stream_generate
    from edge_infer.runtime.model import Model, load
    from edge_infer.runtime.sampling import SamplingParams
    from edge_infer.runtime.speculative import SpeculativeConfig
    from edge_infer.runtime.tool_replies import ToolCall


def __getattr__(name: str) -> Any:
    if name == "export":  # the export package, callable as export(src, out, progress=..., **options) (export/api.py)
        return importlib.import_module("edge_infer.export")
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'edge_infer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
