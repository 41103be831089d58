"""Architectures: one module per Hugging Face `model_type`, found by name.

Each module exposes `spec(config) -> DecoderSpec` and
`recipe(spec, config) -> dict[canonical name, Take]`. Adding an architecture is
adding a module and a line in SUPPORTED; nothing else changes.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from edge_infer.contract.errors import ModelFileError

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "gpt2")
ALIASES = {"gemma3": "gemma3_text", "smollm": "llama", "smollm2": "llama", "tinyllama": "llama"}


def resolve_model_type(model_type: str | None) -> str:
    name = ALIASES.get(model_type or "", model_type or "")
    if name not in SUPPORTED:
        raise ModelFileError(
            f"architecture '{model_type}' is not supported; supported: {', '.join(SUPPORTED)} "
            f"(aliases: {', '.join(sorted(ALIASES))}), plus what optimum-onnx exports as "
            "text-generation-with-past when the export extra is installed"
        )
    return name


def load_arch(model_type: str | None) -> ModuleType:
    return importlib.import_module(f"edge_infer.export.arch.{resolve_model_type(model_type)}")
