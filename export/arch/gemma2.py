"""Gemma 2: (1 + w) RMSNorms around both blocks, scaled embeddings, logit soft-capping,
sliding attention on alternate layers, GELU(tanh)-gated MLP."""

from __future__ import annotations

from edge_infer.export.arch._common import layer_types_of, llama_like_weights, plus_one, sqrt_hidden, tied
from edge_infer.export.arch.llama import llama_spec
from edge_infer.export.spec import DecoderSpec


def gemma_fields(config: dict) -> dict:
    n = int(config["num_hidden_layers"])
    types = layer_types_of(config, n)
    window = config.get("sliding_window")
    scalar = config.get("query_pre_attn_scalar")
    return dict(
        activation="gelu_tanh",
        sandwich_norm=True,
        embed_scale=sqrt_hidden(config),
        attn_scale=float(scalar) ** -0.5 if scalar else None,
        attn_softcap=float(config["attn_logit_softcapping"]) if config.get("attn_logit_softcapping") else None,
        final_softcap=float(config["final_logit_softcapping"]) if config.get("final_logit_softcapping") else None,
        sliding_window=int(window) if window and "sliding" in types else None,
        layer_types=types if window else (),
        tie_word_embeddings=tied(config, True),
    )


def spec(config: dict) -> DecoderSpec:
    config = dict(config, hidden_act=config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh")
    return llama_spec(config, **gemma_fields(config))


def recipe(s: DecoderSpec, config: dict):
    return llama_like_weights(s.num_layers, sandwich=True, norm_transform=plus_one, tied=s.tie_word_embeddings)
