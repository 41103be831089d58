"""Pieces shared by the architecture modules: config reading and weight recipes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from edge_infer.export.spec import RopeSpec
from edge_infer.contract.errors import ModelFileError

# "factors" is not a Hugging Face type: it carries a GGUF's rope_freqs.weight (see export/rope.py).
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope", "factors")


@dataclass(frozen=True)
class Take:
    """One canonical weight: checkpoint tensors concatenated along rows, then transformed.

    With no transform, quantized source blocks (GGUF) can be concatenated as they are.
    """

    sources: tuple[str, ...]
    transform: Callable[[np.ndarray], np.ndarray] | None = None


def take(*sources: str, transform: Callable[[np.ndarray], np.ndarray] | None = None) -> Take:
    return Take(tuple(sources), transform)


def plus_one(w: np.ndarray) -> np.ndarray:
    """Gemma's RMSNorm multiplies by (1 + weight): fold the 1 into the stored weight."""
    return (w.astype(np.float32) + 1.0).astype(np.float32)


def need(config: dict, key: str) -> Any:
    if key not in config or config[key] is None:
        raise ModelFileError(f"config.json: missing required field '{key}' for {config.get('model_type')}")
    return config[key]


def head_dim_of(config: dict) -> int:
    hd = config.get("head_dim")
    return int(hd) if hd else int(need(config, "hidden_size")) // int(need(config, "num_attention_heads"))


def eos_ids(config: dict) -> tuple[int, ...]:
    eos = config.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(int(e) for e in eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def rope_of(config: dict, head_dim: int, theta_key: str = "rope_theta", default_theta: float = 10000.0) -> RopeSpec:
    scaling = dict(config.get("rope_scaling") or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    rope_type = "longrope" if rope_type == "su" else rope_type  # Phi-3's early name
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelFileError(
            f"config.json: rope_scaling type '{rope_type}' is not supported yet "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    factor = float(config.get("partial_rotary_factor", 1.0) or 1.0)
    rotary_dim = int(head_dim * factor)
    items: dict = {}
    if rope_type != "default":
        items = {k: tuple(v) if isinstance(v, list) else v for k, v in scaling.items() if k != "type"}
        items["rope_type"] = rope_type
    if rope_type == "yarn":
        items.setdefault("original_max_position_embeddings", config.get("max_position_embeddings"))
        items["attention_factor"] = _yarn_attention_factor(items)
    elif rope_type == "longrope":
        items.update(_longrope_fields(config, items, rotary_dim))
    elif rope_type == "factors" and len(items.get("factors", ())) != rotary_dim // 2:
        raise ModelFileError(f"rope frequency factors: {len(items.get('factors', ()))} values for a rotary "
                             f"dimension of {rotary_dim} (expected {rotary_dim // 2})")
    return RopeSpec(theta=float(config.get(theta_key) or default_theta), rotary_dim=rotary_dim,
                    scaling=tuple(sorted(items.items())))


def _yarn_attention_factor(s: dict) -> float:
    """YaRN's cos/sin multiplier as transformers infers it: 0.1 ln(factor) + 1 (mscale variants too)."""
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor = float(s["factor"])
    if s.get("mscale") and s.get("mscale_all_dim"):
        return mscale(factor, float(s["mscale"])) / mscale(factor, float(s["mscale_all_dim"]))
    return mscale(factor)


def _longrope_fields(config: dict, s: dict, rotary_dim: int) -> dict:
    """LongRoPE: the original context and the cos/sin multiplier (Phi-3.5 / Phi-4-mini)."""
    for key in ("long_factor", "short_factor"):
        if len(s.get(key) or ()) != rotary_dim // 2:
            raise ModelFileError(f"config.json: rope_scaling.{key} must hold {rotary_dim // 2} values "
                                 f"(half the rotary dimension {rotary_dim})")
    maximum = float(need(config, "max_position_embeddings"))
    original = config.get("original_max_position_embeddings") or s.get("original_max_position_embeddings")
    factor = maximum / float(original) if original else float(s.get("factor") or 1.0)
    original = float(original or maximum)
    attn = s.get("attention_factor")
    if attn is None:
        attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return {"original_max_position_embeddings": int(original), "attention_factor": float(attn)}


def layer_types_of(config: dict, n_layers: int) -> tuple[str, ...]:
    """HF `layer_types` ("sliding_attention" / "full_attention") as ("sliding" / "full")."""
    types = config.get("layer_types")
    if not types:
        return ()
    out = []
    for t in types:
        if t not in ("sliding_attention", "full_attention"):
            raise ModelFileError(f"config.json: unknown layer type '{t}' in layer_types")
        out.append("sliding" if t == "sliding_attention" else "full")
    if len(out) != n_layers:
        raise ModelFileError("config.json: layer_types must have one entry per layer")
    return tuple(out)


def llama_like_weights(n_layers: int, *, qkv_bias: bool = False, qk_norm: bool = False,
                       sandwich: bool = False, norm_transform=None, tied: bool = False) -> dict[str, Take]:
    """Weight recipe for checkpoints named like transformers' LlamaForCausalLM."""
    t = norm_transform
    recipe: dict[str, Take] = {"embed.weight": take("model.embed_tokens.weight"),
                               "final_norm.weight": take("model.norm.weight", transform=t)}
    if not tied:
        recipe["lm_head.weight"] = take("lm_head.weight")
    for i in range(n_layers):
        p, c = f"model.layers.{i}.", f"layers.{i}."
        a = p + "self_attn."
        recipe[c + "input_norm.weight"] = take(p + "input_layernorm.weight", transform=t)
        recipe[c + "qkv.weight"] = take(a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight")
        if qkv_bias:
            recipe[c + "qkv.bias"] = take(a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias")
        if qk_norm:
            recipe[c + "q_norm.weight"] = take(a + "q_norm.weight", transform=t)
            recipe[c + "k_norm.weight"] = take(a + "k_norm.weight", transform=t)
        recipe[c + "o.weight"] = take(a + "o_proj.weight")
        if sandwich:
            recipe[c + "post_attn_norm.weight"] = take(p + "post_attention_layernorm.weight", transform=t)
            recipe[c + "ffn_norm.weight"] = take(p + "pre_feedforward_layernorm.weight", transform=t)
            recipe[c + "post_ffn_norm.weight"] = take(p + "post_feedforward_layernorm.weight", transform=t)
        else:
            recipe[c + "ffn_norm.weight"] = take(p + "post_attention_layernorm.weight", transform=t)
        m = p + "mlp."
        recipe[c + "gate_up.weight"] = take(m + "gate_proj.weight", m + "up_proj.weight")
        recipe[c + "down.weight"] = take(m + "down_proj.weight")
    return recipe


def tied(config: dict, default: bool) -> bool:
    v = config.get("tie_word_embeddings")
    return default if v is None else bool(v)


def sqrt_hidden(config: dict) -> float:
    return math.sqrt(float(need(config, "hidden_size")))
