"""Qwen2 / Qwen2.5: llama plus biases on q, k and v (no bias on o)."""

from __future__ import annotations

from edge_infer.export.arch._common import layer_types_of, llama_like_weights
from edge_infer.export.arch.llama import llama_spec
from edge_infer.export.spec import DecoderSpec


def spec(config: dict) -> DecoderSpec:
    n = int(config["num_hidden_layers"])
    window = config.get("sliding_window") if config.get("use_sliding_window") else None
    types = layer_types_of(config, n) if window else ()
    return llama_spec(config, qkv_bias=True, o_bias=False,
                      sliding_window=int(window) if window else None, layer_types=types)


def recipe(s: DecoderSpec, config: dict):
    return llama_like_weights(s.num_layers, qkv_bias=True, tied=s.tie_word_embeddings)
