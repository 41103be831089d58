"""Gemma 3 (text): Gemma 2 plus (1 + w) q/k norms and a separate rotary base for sliding layers."""

from __future__ import annotations

from dataclasses import replace

from edge_infer.export.arch._common import llama_like_weights, plus_one, rope_of
from edge_infer.export.arch.gemma2 import gemma_fields
from edge_infer.export.arch.llama import llama_spec
from edge_infer.export.spec import DecoderSpec


def spec(config: dict) -> DecoderSpec:
    config = dict(config, hidden_act=config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh")
    s = llama_spec(config, qk_norm=True, **gemma_fields(config))
    local = rope_of(dict(config, rope_scaling=None), s.head_dim, theta_key="rope_local_base_freq")
    return replace(s, local_rope=local)


def recipe(s: DecoderSpec, config: dict):
    return llama_like_weights(s.num_layers, qk_norm=True, sandwich=True, norm_transform=plus_one,
                              tied=s.tie_word_embeddings)
