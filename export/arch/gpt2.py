"""GPT-2: LayerNorm with bias, learned positions, fused c_attn stored as Conv1D (in, out)."""

from __future__ import annotations

import numpy as np

from edge_infer.export.arch._common import eos_ids, need, take, tied
from edge_infer.export.spec import DecoderSpec


# Each layer's weights and biases: (canonical name, GPT-2's module, stored as Conv1D (in, out)).
_LAYER = (("input_norm", "ln_1", False), ("qkv", "attn.c_attn", True), ("o", "attn.c_proj", True),
          ("ffn_norm", "ln_2", False), ("up", "mlp.c_fc", True), ("down", "mlp.c_proj", True))


def _t(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.T)  # Conv1D (in, out) -> linear (out, in)


def spec(config: dict) -> DecoderSpec:
    d = int(need(config, "n_embd"))
    heads = int(need(config, "n_head"))
    if config.get("scale_attn_by_inverse_layer_idx") or config.get("reorder_and_upcast_attn"):
        from edge_infer.contract.errors import ModelFileError

        raise ModelFileError("gpt2: scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported")
    act = config.get("activation_function", "gelu_new")
    return DecoderSpec(
        model_type="gpt2", vocab_size=int(need(config, "vocab_size")), hidden_size=d,
        intermediate_size=int(config.get("n_inner") or 4 * d), num_layers=int(need(config, "n_layer")),
        num_heads=heads, num_kv_heads=heads, head_dim=d // heads,
        max_position_embeddings=int(need(config, "n_positions")), norm="layer",
        norm_eps=float(config.get("layer_norm_epsilon", 1e-5)),
        activation="gelu_tanh" if act in ("gelu_new", "gelu_pytorch_tanh") else "gelu",
        mlp="plain", position="learned", rope=None, tie_word_embeddings=tied(config, True),
        qkv_bias=True, o_bias=True, mlp_bias=True,
        attn_scale=None if config.get("scale_attn_weights", True) else 1.0,
        bos_token_id=config.get("bos_token_id"), eos_token_ids=eos_ids(config),
        pad_token_id=config.get("pad_token_id"),
    )


def recipe(s: DecoderSpec, config: dict):
    r = {"embed.weight": take("transformer.wte.weight"),
         "embed_positions.weight": take("transformer.wpe.weight"),
         "final_norm.weight": take("transformer.ln_f.weight"),
         "final_norm.bias": take("transformer.ln_f.bias")}
    if not s.tie_word_embeddings:
        r["lm_head.weight"] = take("lm_head.weight")
    for i in range(s.num_layers):
        p, c = f"transformer.h.{i}.", f"layers.{i}."
        for ours, theirs, conv1d in _LAYER:
            r[c + ours + ".weight"] = take(p + theirs + ".weight", transform=_t if conv1d else None)
            r[c + ours + ".bias"] = take(p + theirs + ".bias")
    return r
