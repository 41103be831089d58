"""Phi-3 / Phi-3.5 / Phi-4-mini: fused qkv_proj and gate_up_proj, optional partial rotary."""

from __future__ import annotations

from edge_infer.export.arch._common import take
from edge_infer.export.arch.mistral import spec  # noqa: F401  (same config: llama + optional window)
from edge_infer.export.spec import DecoderSpec


def recipe(s: DecoderSpec, config: dict):
    r = {"embed.weight": take("model.embed_tokens.weight"), "final_norm.weight": take("model.norm.weight")}
    if not s.tie_word_embeddings:
        r["lm_head.weight"] = take("lm_head.weight")
    for i in range(s.num_layers):
        p, c = f"model.layers.{i}.", f"layers.{i}."
        r[c + "input_norm.weight"] = take(p + "input_layernorm.weight")
        r[c + "qkv.weight"] = take(p + "self_attn.qkv_proj.weight")
        r[c + "o.weight"] = take(p + "self_attn.o_proj.weight")
        r[c + "ffn_norm.weight"] = take(p + "post_attention_layernorm.weight")
        r[c + "gate_up.weight"] = take(p + "mlp.gate_up_proj.weight")
        r[c + "down.weight"] = take(p + "mlp.down_proj.weight")
    return r
