"""Qwen3: llama plus an RMSNorm over each head of q and k before rotary."""

from __future__ import annotations

from edge_infer.export.arch._common import layer_types_of, llama_like_weights
from edge_infer.export.arch.llama import llama_spec
from edge_infer.export.spec import DecoderSpec


def spec(config: dict) -> DecoderSpec:
    n = int(config["num_hidden_layers"])
    window = config.get("sliding_window") if config.get("use_sliding_window") else None
    types = layer_types_of(config, n) if window else ()
    bias = bool(config.get("attention_bias", False))
    return llama_spec(config, qk_norm=True, qkv_bias=bias, o_bias=bias,
                      sliding_window=int(window) if window else None, layer_types=types)


def recipe(s: DecoderSpec, config: dict):
    if s.qkv_bias:
        from edge_infer.contract.errors import ModelFileError

        raise ModelFileError("qwen3 checkpoints with attention_bias are not supported yet")
    return llama_like_weights(s.num_layers, qk_norm=True, tied=s.tie_word_embeddings)
