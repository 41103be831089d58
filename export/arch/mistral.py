"""Mistral: llama plus an optional sliding attention window on every layer."""

from __future__ import annotations

from edge_infer.export.arch._common import llama_like_weights
from edge_infer.export.arch.llama import llama_spec
from edge_infer.export.spec import DecoderSpec


def spec(config: dict) -> DecoderSpec:
    window = config.get("sliding_window")
    n = int(config["num_hidden_layers"])
    return llama_spec(config, sliding_window=int(window) if window else None,
                      layer_types=("sliding",) * n if window else ())


def recipe(s: DecoderSpec, config: dict):
    return llama_like_weights(s.num_layers, tied=s.tie_word_embeddings)
