"""Llama (Llama 2/3, SmolLM, TinyLlama): RMSNorm, rotary, SiLU-gated MLP, GQA."""

from __future__ import annotations

from edge_infer.export.arch._common import (
    eos_ids, head_dim_of, llama_like_weights, need, rope_of, tied,
)
from edge_infer.export.spec import DecoderSpec


def llama_spec(config: dict, **overrides) -> DecoderSpec:
    """The spec of a llama-shaped decoder; the other families override a few fields."""
    hd = head_dim_of(config)
    heads = int(need(config, "num_attention_heads"))
    fields = dict(
        model_type=config["model_type"],
        vocab_size=int(need(config, "vocab_size")),
        hidden_size=int(need(config, "hidden_size")),
        intermediate_size=int(need(config, "intermediate_size")),
        num_layers=int(need(config, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=hd,
        max_position_embeddings=int(config.get("max_position_embeddings") or 2048),
        norm="rms",
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        activation="silu",
        mlp="gated",
        position="rope",
        rope=rope_of(config, hd),
        tie_word_embeddings=tied(config, False),
        qkv_bias=bool(config.get("attention_bias", False)),
        o_bias=bool(config.get("attention_bias", False)),
        mlp_bias=bool(config.get("mlp_bias", False)),
        bos_token_id=config.get("bos_token_id"),
        eos_token_ids=eos_ids(config),
        pad_token_id=config.get("pad_token_id"),
    )
    if config.get("hidden_act", "silu") != "silu":
        fields["activation"] = _activation(config["hidden_act"])
    fields.update(overrides)
    return DecoderSpec(**fields)


def _activation(name: str) -> str:
    from edge_infer.contract.errors import ModelFileError

    table = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
             "gelu": "gelu"}
    if name not in table:
        raise ModelFileError(f"config.json: activation '{name}' is not supported (supported: {', '.join(table)})")
    return table[name]


def spec(config: dict) -> DecoderSpec:
    return llama_spec(config)


def recipe(s: DecoderSpec, config: dict):
    if s.o_bias or s.mlp_bias:
        from edge_infer.contract.errors import ModelFileError

        raise ModelFileError("llama checkpoints with attention_bias/mlp_bias are not supported yet")
    return llama_like_weights(s.num_layers, tied=s.tie_word_embeddings)
