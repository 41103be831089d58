"""GGUF families: how llama.cpp's converter (convert_hf_to_gguf.py) writes each one, read back
as a transformers-style config and Hugging Face weight names, so `export/arch/<model_type>.py`
builds the same graph from a GGUF as from the Hugging Face folder.

What differs per family (facts from llama.cpp's converter and its hparams loader):
    llama    attn_q / attn_k rows permuted for llama.cpp's interleaved rotary (undone here);
             Llama 3 scaling stored as per-dimension divisors in `rope_freqs.weight`;
             Mistral / Ministral GGUFs are written as `llama` (llama.cpp uses no sliding window)
    qwen2    q/k/v biases; no permutation (rotary halves, as in Hugging Face)
    qwen3    attn_q_norm / attn_k_norm (per-head RMSNorm)
    phi3     fused `attn_qkv` (or separate q/k/v) and gate+up fused in `ffn_up` (gate rows first);
             partial rotary from rope.dimension_count; LongRoPE as `rope_factors_long/short`
             tensors with rope.scaling.attn_factor; llama.cpp applies no sliding window
    gemma2   every `*norm.weight` stored with the +1 of Gemma's RMSNorm already added;
             sandwich norms (post_attention_norm, ffn_norm = pre-FFN, post_ffw_norm);
             soft-caps in metadata; sliding window on layers 0, 2, 4, ...; attention scale
             1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 46-layer 27B), as llama.cpp hardcodes
    gemma3   gemma2's norms plus q/k norms; every 6th layer full, the others sliding with rope base
             10000 (rope.freq_base_swa when present); linear rope scaling on full layers only
    gpt2     learned positions (position_embd), LayerNorms with bias, fused attn_qkv; the converter stores
             the Conv1D weights transposed to (out, in) and writes the tied head again as `output`
Rope scaling metadata (rope.scaling.type linear / yarn / longrope) maps to Hugging Face's
`rope_scaling` for every family; `rope_freqs.weight` becomes the internal "factors" kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from edge_infer.export.gguf_file import GGUFFile, GGUFTensor, _fail, unpermute_rows
from edge_infer.export.gguf_limits import GeometryClaims, block_ids, check_geometry, check_weight_types
from edge_infer.contract.errors import ModelFileError

_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_ATTN = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj"}
_MLP = {"ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_LLAMA_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", **_ATTN, **_MLP}
_QK_NORM = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_GEMMA_BLOCK = {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
                "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
                **_ATTN, **_MLP}
_PHI3_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_qkv": "self_attn.qkv_proj", **_ATTN, "ffn_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj"}
# Tensors that are not weights but rope tables: read into the config.
_ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


@dataclass(frozen=True)
class Family:
    """One GGUF `general.architecture` and how it maps onto a Hugging Face model_type."""

    model_type: str
    hf_class: str
    block: dict[str, str]  # GGUF block tensor stem -> HF stem (under model.layers.{i}.)
    required: tuple[str, ...]  # HF stems every layer must have
    permute_qk: bool = False  # llama: undo the converter's rotary row permutation
    norm_shift: float = 0.0  # gemma: the converter added this to every norm weight
    extra: Callable[[GGUFFile, str, dict], dict] | None = None  # family-specific config fields
    biases: tuple[str, ...] = field(default=())  # HF stems whose bias every layer must have


def _gemma2(g: GGUFFile, arch: str, c: dict) -> dict:
    n = c["num_hidden_layers"]
    window = _meta(g, f"{arch}.attention.sliding_window", int, None)
    return {
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": _attn_scalar(c, n == 46),
        "attn_logit_softcapping": _meta(g, f"{arch}.attn_logit_softcapping", (int, float), None),
        "final_logit_softcapping": _meta(g, f"{arch}.final_logit_softcapping", (int, float), None),
        "sliding_window": window,
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)],
    }


def _gemma3(g: GGUFFile, arch: str, c: dict) -> dict:
    n = c["num_hidden_layers"]
    window = _meta(g, f"{arch}.attention.sliding_window", int, None)
    sliding = bool(window and window > 0)
    return {
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": _attn_scalar(c, n == 62),
        "final_logit_softcapping": _meta(g, f"{arch}.final_logit_softcapping", (int, float), None),
        "attn_logit_softcapping": None,
        "sliding_window": window if sliding else None,
        "rope_local_base_freq": float(_meta(g, f"{arch}.rope.freq_base_swa", (int, float), 10000.0)),
        "layer_types": [("full_attention" if (i + 1) % 6 == 0 or not sliding else "sliding_attention")
                        for i in range(n)],
    }


def _attn_scalar(c: dict, is_27b: bool) -> float:
    # llama.cpp: 1/sqrt(head_dim), except the 27B models: 1/sqrt(hidden / heads).
    return float(c["hidden_size"] // c["num_attention_heads"] if is_27b else c["head_dim"])


_BASE = ("input_layernorm", "self_attn.o_proj", "mlp.down_proj")
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "LlamaForCausalLM", _LLAMA_BLOCK,
                    _BASE + _QKV + ("post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj"), permute_qk=True),
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", _LLAMA_BLOCK,
                    _BASE + _QKV + ("post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj"),
                    biases=_QKV),
    "qwen3": Family("qwen3", "Qwen3ForCausalLM", {**_LLAMA_BLOCK, **_QK_NORM},
                    _BASE + _QKV + ("post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj",
                                    "self_attn.q_norm", "self_attn.k_norm")),
    "phi3": Family("phi3", "Phi3ForCausalLM", _PHI3_BLOCK,
                   _BASE + ("post_attention_layernorm", "mlp.gate_up_proj")),
    "gemma2": Family("gemma2", "Gemma2ForCausalLM", _GEMMA_BLOCK,
                     _BASE + _QKV + ("post_attention_layernorm", "pre_feedforward_layernorm",
                                     "post_feedforward_layernorm", "mlp.gate_proj", "mlp.up_proj"),
                     norm_shift=1.0, extra=_gemma2),
    "gemma3": Family("gemma3_text", "Gemma3ForCausalLM", {**_GEMMA_BLOCK, **_QK_NORM},
                     _BASE + _QKV + ("post_attention_layernorm", "pre_feedforward_layernorm",
                                     "post_feedforward_layernorm", "mlp.gate_proj", "mlp.up_proj",
                                     "self_attn.q_norm", "self_attn.k_norm"),
                     norm_shift=1.0, extra=_gemma3),
}
SUPPORTED_ARCHS = (*FAMILIES, "gpt2")


@dataclass(frozen=True, eq=False)
class Shifted:
    """A GGUF norm weight with the converter's +shift taken off again (Gemma: w + 1 -> w)."""

    tensor: GGUFTensor
    shift: float

    @property
    def shape(self) -> tuple[int, ...]:
        return self.tensor.shape

    def dequantize(self) -> np.ndarray:
        return (self.tensor.dequantize().astype(np.float64) - self.shift).astype(np.float32)

    def blocks(self):
        return None


# Config fields transformers' GGUF loader (4.57) does not read from the file (llama.cpp reads them from
# metadata or hardcodes them); export validation passes them to it from our reading of the file.
TRANSFORMERS_UNREAD = ("rope_scaling", "original_max_position_embeddings", "partial_rotary_factor", "head_dim",
                       "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "layer_types",
                       "rope_local_base_freq", "n_positions")


def transformers_overrides(config: dict) -> tuple[dict, str | None]:
    """(config overrides for transformers' GGUF loader, None) or ({}, why it cannot load this file right)."""
    if (config.get("rope_scaling") or {}).get("rope_type") == "factors":
        return {}, "transformers' GGUF loader cannot apply Llama 3 scaling given as rope_freqs.weight factors"
    unread = {k: config[k] for k in TRANSFORMERS_UNREAD if config.get(k) is not None}
    unread["pad_token_id"] = config.get("pad_token_id")  # no padding id in the file: none (not a class default)
    return unread, None


def _meta(g: GGUFFile, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    if key not in g.metadata:
        if default is ...:
            raise _fail(g.path, f"metadata key '{key}' is missing", "the file is incomplete: convert it again")
        return default
    value = g.metadata[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise _fail(g.path, f"metadata key '{key}' is {value!r}, expected {kind}")
    return value


def unsupported_arch(path: str, arch: str) -> ModelFileError:
    return _fail(path, f"architecture '{arch}' is not supported from GGUF (supported: {', '.join(SUPPORTED_ARCHS)})",
                 "a Hugging Face folder of the same model may export through the optimum route "
                 "(pip install 'edge-infer[export]')")


def _rope_tensor(g: GGUFFile, name: str, size: int) -> list[float]:
    t = g.tensors[name]
    if t.shape != (size,):
        raise _fail(g.path, f"tensor '{name}' has shape {t.shape}, expected ({size},) (half the rotary dimension)")
    values = t.dequantize().astype(np.float64)
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise _fail(g.path, f"tensor '{name}' holds non-positive or non-finite rope factors")
    return values.tolist()


def _rope_scaling(g: GGUFFile, arch: str, rope_dim: int, context: int) -> tuple[dict | None, dict]:
    """(HF rope_scaling, extra top-level config fields) from rope metadata and rope tensors."""
    num = (int, float)
    kind = _meta(g, f"{arch}.rope.scaling.type", str, "none")
    original = _meta(g, f"{arch}.rope.scaling.original_context_length", int, None)
    has = {n: n in g.tensors for n in _ROPE_TENSORS}
    if has["rope_freqs.weight"]:
        if kind not in ("none", "linear") or _meta(g, f"{arch}.rope.scaling.factor", num, 1.0) != 1.0:
            raise _fail(g.path, f"rope_freqs.weight together with rope.scaling.type '{kind}' is not supported")
        return {"rope_type": "factors", "factors": _rope_tensor(g, "rope_freqs.weight", rope_dim // 2)}, {}
    if has["rope_factors_long.weight"] != has["rope_factors_short.weight"]:
        raise _fail(g.path, "rope_factors_long.weight and rope_factors_short.weight come as a pair")
    if has["rope_factors_long.weight"]:
        if original is None:
            raise _fail(g.path, f"LongRoPE factors without '{arch}.rope.scaling.original_context_length'")
        scaling: dict[str, Any] = {"rope_type": "longrope",
                                   "long_factor": _rope_tensor(g, "rope_factors_long.weight", rope_dim // 2),
                                   "short_factor": _rope_tensor(g, "rope_factors_short.weight", rope_dim // 2)}
        attn = _meta(g, f"{arch}.rope.scaling.attn_factor", num, None)
        if attn is not None:
            scaling["attention_factor"] = float(attn)
        return scaling, {"original_max_position_embeddings": original}
    if kind == "none":
        return None, {}
    factor = float(_meta(g, f"{arch}.rope.scaling.factor", num))
    if kind == "linear":
        return ({"rope_type": "linear", "factor": factor} if factor != 1.0 else None), {}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original or context}
        for key, hf in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
                        ("yarn_attn_factor", "attention_factor")):
            value = _meta(g, f"{arch}.rope.scaling.{key}", num, None)
            if value is not None:
                scaling[hf] = float(value)
        ext = _meta(g, f"{arch}.rope.scaling.yarn_ext_factor", num, None)
        log_mul = _meta(g, f"{arch}.rope.scaling.yarn_log_multiplier", num, None)
        if (ext is not None and ext not in (1.0, -1.0)) or log_mul not in (None, 0.0, 0.1):
            raise _fail(g.path, "YaRN with a custom ext_factor or log multiplier is not supported")
        return scaling, {}
    raise _fail(g.path, f"rope scaling type '{kind}' is not supported (supported: none, linear, yarn, "
                "longrope, and Llama 3 factors in rope_freqs.weight)")


def gguf_to_hf(g: GGUFFile) -> tuple[dict, dict[str, Any], dict]:
    """(transformers-style config, HF weight name -> lazily read tensor, tokenizer metadata)."""
    arch = _meta(g, "general.architecture", str)
    if arch == "gpt2":
        return _gpt2(g)
    if arch not in FAMILIES:
        raise unsupported_arch(g.path, arch)
    fam = FAMILIES[arch]
    num = (int, float)
    hidden = _meta(g, f"{arch}.embedding_length", int)
    heads = _meta(g, f"{arch}.attention.head_count", int)
    kv_heads = _meta(g, f"{arch}.attention.head_count_kv", int, heads)
    layers = _meta(g, f"{arch}.block_count", int)
    if min(hidden, heads, kv_heads, layers) <= 0 or heads % kv_heads:
        raise _fail(g.path, f"inconsistent geometry: hidden {hidden}, heads {heads}, kv heads {kv_heads}, "
                    f"layers {layers}")
    if f"{arch}.attention.key_length" not in g.metadata and hidden % heads:
        raise _fail(g.path, f"hidden size {hidden} is not a multiple of {heads} heads and no key_length is given")
    head_dim = _meta(g, f"{arch}.attention.key_length", int, hidden // heads)
    value_dim = _meta(g, f"{arch}.attention.value_length", int, head_dim)
    rope_dim = _meta(g, f"{arch}.rope.dimension_count", int, head_dim)
    if value_dim != head_dim or not 0 < rope_dim <= head_dim or rope_dim % 2:
        raise _fail(g.path, f"head dims: key {head_dim}, value {value_dim}, rotary {rope_dim} are not supported")
    context = _meta(g, f"{arch}.context_length", int)
    scaling, rope_extra = _rope_scaling(g, arch, rope_dim, context)
    tokens = g.metadata.get("tokenizer.ggml.tokens")
    embd = g.tensors.get("token_embd.weight")
    vocab = _meta(g, f"{arch}.vocab_size", int, len(tokens) if isinstance(tokens, list)
                  else embd.shape[0] if embd is not None else 0)
    # Bounds before anything is sized from them (hostile files): ranges, consistency, and the layer
    # count backed by tensors actually present; integer-typed weights refused.
    check_geometry(g.path, arch, GeometryClaims(
        layers, hidden, heads, kv_heads, head_dim, _meta(g, f"{arch}.feed_forward_length", int), vocab, context,
        float(_meta(g, f"{arch}.attention.layer_norm_rms_epsilon", num)),
        float(_meta(g, f"{arch}.rope.freq_base", num, 10000.0))), len(g.tensors), block_ids(g.tensors))
    check_weight_types(g.path, {name: t.ggml_type for name, t in g.tensors.items()})
    config = {
        "model_type": fam.model_type, "architectures": [fam.hf_class],
        "hidden_size": hidden,
        "intermediate_size": _meta(g, f"{arch}.feed_forward_length", int),
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": head_dim, "hidden_act": "silu",
        "partial_rotary_factor": rope_dim / head_dim if rope_dim != head_dim else 1.0,
        "rms_norm_eps": float(_meta(g, f"{arch}.attention.layer_norm_rms_epsilon", num)),
        "rope_theta": float(_meta(g, f"{arch}.rope.freq_base", num, 10000.0)),
        "rope_scaling": scaling, **rope_extra,
        "max_position_embeddings": context,
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "attention_bias": "blk.0.attn_q.bias" in g.tensors or "blk.0.attn_qkv.bias" in g.tensors,
        "bos_token_id": _meta(g, "tokenizer.ggml.bos_token_id", int, None),
        "eos_token_id": _meta(g, "tokenizer.ggml.eos_token_id", int, None),
        "pad_token_id": _meta(g, "tokenizer.ggml.padding_token_id", int, None),
        "torch_dtype": "float32",
    }
    if fam.extra is not None:
        config.update(fam.extra(g, arch, config))
    weights = _weights(g, fam, config)
    tokenizer = {k: v for k, v in g.metadata.items() if k.startswith("tokenizer.")}
    return config, weights, tokenizer


def _expected_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """HF name stem -> numpy shape of its weight (a bias has the first entry)."""
    hidden, hd, ffn, vocab = c["hidden_size"], c["head_dim"], c["intermediate_size"], c["vocab_size"]
    q_rows, kv_rows = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    return {
        "model.embed_tokens": (vocab, hidden), "model.norm": (hidden,), "lm_head": (vocab, hidden),
        "input_layernorm": (hidden,), "post_attention_layernorm": (hidden,),
        "pre_feedforward_layernorm": (hidden,), "post_feedforward_layernorm": (hidden,),
        "self_attn.q_proj": (q_rows, hidden), "self_attn.k_proj": (kv_rows, hidden),
        "self_attn.v_proj": (kv_rows, hidden), "self_attn.o_proj": (hidden, q_rows),
        "self_attn.qkv_proj": (q_rows + 2 * kv_rows, hidden),
        "self_attn.q_norm": (hd,), "self_attn.k_norm": (hd,),
        "mlp.gate_proj": (ffn, hidden), "mlp.up_proj": (ffn, hidden), "mlp.down_proj": (hidden, ffn),
        "mlp.gate_up_proj": (2 * ffn, hidden),
    }


def _weights(g: GGUFFile, fam: Family, c: dict) -> dict[str, Any]:
    layers = c["num_hidden_layers"]
    expected = _expected_shapes(c)
    weights: dict[str, Any] = {}
    unknown = []
    for name, t in g.tensors.items():
        if name in _ROPE_TENSORS:
            continue
        parts = name.split(".")
        stem, suffix = ".".join(parts[:-1]), parts[-1]
        layer = None
        if stem in _TOP:
            hf_stem = _TOP[stem]
        elif (len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in fam.block
              and int(parts[1]) < layers):
            layer, hf_stem = int(parts[1]), fam.block[parts[2]]
        else:
            unknown.append(name)
            continue
        if suffix not in ("weight", "bias"):
            unknown.append(name)
            continue
        want = expected[hf_stem] if suffix == "weight" else expected[hf_stem][:1]
        if t.shape != want:
            raise _fail(g.path, f"tensor '{name}' has shape {t.shape}, expected {want} from the metadata")
        if fam.permute_qk and hf_stem in ("self_attn.q_proj", "self_attn.k_proj"):
            n = c["num_attention_heads"] if hf_stem == "self_attn.q_proj" else c["num_key_value_heads"]
            t = t.with_row_order(unpermute_rows(t.shape[0], n))
        prefix = "" if layer is None else f"model.layers.{layer}."
        if fam.norm_shift and hf_stem.endswith(("layernorm", "norm", "_norm")) and suffix == "weight":
            weights[f"{prefix}{hf_stem}.{suffix}"] = Shifted(t, fam.norm_shift)
        else:
            weights[f"{prefix}{hf_stem}.{suffix}"] = t
    if unknown:
        raise _fail(g.path, f"unexpected tensors for architecture '{g.metadata['general.architecture']}': "
                    f"{', '.join(unknown[:8])}", "this variant is not supported")
    _fuse_phi3_qkv_names(g, weights, fam, layers)
    required = ["model.embed_tokens.weight", "model.norm.weight"] + [
        f"model.layers.{i}.{stem}.weight" for i in range(layers) for stem in fam.required]
    required += [f"model.layers.{i}.{stem}.bias" for i in range(layers) for stem in fam.biases]
    missing = [n for n in required if n not in weights]
    if missing:
        raise _fail(g.path, f"missing tensors: {', '.join(missing[:8])}", "the file is incomplete: convert it again")
    return weights


def _fuse_phi3_qkv_names(g: GGUFFile, weights: dict[str, Any], fam: Family, layers: int) -> None:
    """phi3 files hold attn_qkv, or (some converters) separate q/k/v: require one of the two."""
    if fam.model_type != "phi3":
        return
    for i in range(layers):
        p = f"model.layers.{i}.self_attn."
        if p + "qkv_proj.weight" in weights:
            continue
        parts = [weights.get(p + f"{x}_proj.weight") for x in "qkv"]
        if any(x is None for x in parts):
            raise _fail(g.path, f"layer {i} has neither attn_qkv nor attn_q/attn_k/attn_v")
        weights[p + "qkv_proj.weight"] = _Concat(tuple(parts))
        for x in "qkv":
            del weights[p + f"{x}_proj.weight"]


@dataclass(frozen=True, eq=False)
class _Concat:
    """Weights stacked along rows (separate q, k, v read as phi3's fused qkv_proj)."""

    parts: tuple

    @property
    def shape(self) -> tuple[int, ...]:
        return (sum(p.shape[0] for p in self.parts),) + tuple(self.parts[0].shape[1:])

    def dequantize(self) -> np.ndarray:
        return np.concatenate([p.dequantize() for p in self.parts], axis=0)

    def blocks(self):
        from edge_infer.export.checkpoint import concat_blocks

        parts = [p.blocks() for p in self.parts]
        return None if any(b is None for b in parts) else concat_blocks(parts)


@dataclass(frozen=True, eq=False)
class _Transposed:
    """A 2-D GGUF weight (out, in) seen as GPT-2's Conv1D (in, out); its blocks do not survive."""

    tensor: GGUFTensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.tensor.shape))

    @property
    def ggml_type(self) -> str:
        return self.tensor.ggml_type

    def dequantize(self) -> np.ndarray:
        return np.ascontiguousarray(self.tensor.dequantize().T)

    def blocks(self):
        return None


_GPT2_TOP = {"token_embd": "transformer.wte", "position_embd": "transformer.wpe", "output_norm": "transformer.ln_f",
             "output": "lm_head"}
_GPT2_BLOCK = {"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_norm": "ln_2",
               "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}
_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def _gpt2(g: GGUFFile) -> tuple[dict, dict[str, Any], dict]:
    hidden = _meta(g, "gpt2.embedding_length", int)
    heads = _meta(g, "gpt2.attention.head_count", int)
    layers = _meta(g, "gpt2.block_count", int)
    if min(hidden, heads, layers) <= 0 or hidden % heads:
        raise _fail(g.path, f"inconsistent geometry: hidden {hidden}, heads {heads}, layers {layers}")
    embd = g.tensors.get("token_embd.weight")
    if embd is None or len(embd.shape) != 2:
        raise _fail(g.path, "missing tensors: token_embd.weight", "the file is incomplete: convert it again")
    ffn = _meta(g, "gpt2.feed_forward_length", int, 4 * hidden)
    check_geometry(g.path, "gpt2", GeometryClaims(
        layers, hidden, heads, heads, hidden // heads, ffn, embd.shape[0], _meta(g, "gpt2.context_length", int),
        float(_meta(g, "gpt2.attention.layer_norm_epsilon", (int, float), 1e-5)), 10000.0),
        len(g.tensors), block_ids(g.tensors))
    check_weight_types(g.path, {name: t.ggml_type for name, t in g.tensors.items()})
    config = {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": hidden, "n_head": heads,
        "n_layer": layers, "n_inner": ffn, "n_positions": _meta(g, "gpt2.context_length", int),
        "layer_norm_epsilon": float(_meta(g, "gpt2.attention.layer_norm_epsilon", (int, float), 1e-5)),
        "activation_function": "gelu_new", "vocab_size": embd.shape[0],
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "bos_token_id": _meta(g, "tokenizer.ggml.bos_token_id", int, None),
        "eos_token_id": _meta(g, "tokenizer.ggml.eos_token_id", int, None),
        "pad_token_id": _meta(g, "tokenizer.ggml.padding_token_id", int, None),
    }
    conv = {"attn.c_attn": (hidden, 3 * hidden), "attn.c_proj": (hidden, hidden), "mlp.c_fc": (hidden, ffn),
            "mlp.c_proj": (ffn, hidden)}
    weights: dict[str, Any] = {}
    unknown = []
    for name, tensor in g.tensors.items():
        t: GGUFTensor | _Transposed = tensor
        parts = name.split(".")
        stem, suffix = ".".join(parts[:-1]), parts[-1]
        if stem in _GPT2_TOP and suffix in ("weight", "bias"):
            hf = f"{_GPT2_TOP[stem]}.{suffix}"
        elif (len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and int(parts[1]) < layers
              and parts[2] in _GPT2_BLOCK and suffix in ("weight", "bias")):
            hf = f"transformer.h.{parts[1]}.{_GPT2_BLOCK[parts[2]]}.{suffix}"
        else:
            unknown.append(name)
            continue
        module = ".".join(hf.split(".")[3:-1])
        want: tuple[int, ...]
        if module in _CONV1D and suffix == "weight":
            t = _Transposed(tensor)
            want = conv[module]
        elif module in _CONV1D:
            want = (conv[module][1],)
        elif hf.startswith("transformer.wpe"):
            want = (config["n_positions"], hidden)
        elif hf.startswith(("transformer.wte", "lm_head")):
            want = (config["vocab_size"], hidden)
        else:
            want = (hidden,)
        if t.shape != want:
            raise _fail(g.path, f"tensor '{name}' has shape {t.shape}, expected {want} from the metadata")
        weights[hf] = t
    if unknown:
        raise _fail(g.path, f"unexpected tensors for architecture 'gpt2': {', '.join(unknown[:8])}",
                    "this variant is not supported")
    required = ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"] + [
        f"transformer.h.{i}.{m}.{x}" for i in range(layers) for m in _GPT2_BLOCK.values() for x in ("weight", "bias")]
    missing = [n for n in required if n not in weights]
    if missing:
        raise _fail(g.path, f"missing tensors: {', '.join(missing[:8])}", "the file is incomplete: convert it again")
    return config, weights, {k: v for k, v in g.metadata.items() if k.startswith("tokenizer.")}
