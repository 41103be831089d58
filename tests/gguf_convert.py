"""Write a tiny Hugging Face checkpoint as a GGUF the way llama.cpp's converter does.

Facts from llama.cpp's convert_hf_to_gguf.py (no code from it): tensor names come from
gguf's own TensorNameMap; llama permutes attn_q / attn_k rows for its interleaved rotary
and stores Llama 3 scaling as per-dimension divisors in `rope_freqs.weight`; gemma adds 1
to every `*norm.weight` and drops the tied lm_head; phi3 keeps qkv_proj and gate_up_proj
fused and stores LongRoPE factors as `rope_factors_long/short` with the attention factor
in metadata. The tokenizer is the tests' byte-level BPE (`gpt2` model, `gpt2` pre).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as QT

from tiny import CHATML, make_tokenizer

# Byte offsets of the f16 scale fields in a block, for types gguf cannot quantize to.
F16_FIELDS = {QT.Q4_K: [0, 2], QT.Q6_K: [208], QT.Q5_K: [0, 2], QT.Q3_K: [108], QT.Q2_K: [80, 82],
              QT.IQ4_NL: [0], QT.IQ4_XS: [0]}

GGUF_ARCH = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
             "gemma2": "gemma2", "gemma3_text": "gemma3"}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotary halves -> llama.cpp's interleaved rows: reshape (heads, 2, half) and swap."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_factors(cfg, rope_dim: int) -> list[float]:
    s = cfg.rope_scaling
    base = cfg.rope_theta
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old = s["original_max_position_embeddings"]
    out = []
    for i in range(0, rope_dim, 2):
        freq = 1.0 / (base ** (i / rope_dim))
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return out


def random_blocks(shape, qtype: QT, rng) -> np.ndarray:
    """Random but valid blocks of `qtype` (bytes with small f16 scales); Q8_0 is quantized from noise."""
    if qtype == QT.Q8_0:
        return gguf.quants.quantize(rng.normal(0, 0.3, shape).astype(np.float32), qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    n, k = shape
    raw = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    for pos in F16_FIELDS[qtype]:
        raw[..., pos:pos + 2] = rng.uniform(0.0005, 0.004, (n, k // block)).astype(np.float16).view(
            np.uint8).reshape(n, k // block, 2)
    return raw.reshape(n, -1)


def write_gguf(kind: str, model, path: Path, qtype: QT = QT.F32, chat_template: str | None = CHATML) -> Path:
    """`model` (a transformers CausalLM of family `kind`) as llama.cpp's converter would write it.
    2-D weights get `qtype`: F32, or what gguf.quants can write (F16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1)
    from the model's weights; K-quants as random valid blocks (gguf cannot write them), so the file
    then holds other weights than the model: compare exports of the file with each other.
    chat_template=None writes no tokenizer.chat_template (as many GGUF files on the hub)."""
    cfg = model.config
    arch = GGUF_ARCH[kind]
    if kind == "gpt2":
        return _write_gpt2(model, path, chat_template)
    n_layers, heads, kv = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{kind}")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    rope_dim = int(head_dim * (getattr(cfg, "partial_rotary_factor", None) or 1.0))
    if kind == "phi3":
        rope_dim = int((getattr(cfg, "partial_rotary_factor", None) or 1.0) * cfg.hidden_size) // heads
    w.add_rope_dimension_count(rope_dim)
    if head_dim != cfg.hidden_size // heads or kind.startswith("gemma"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    scaling = dict(getattr(cfg, "rope_scaling", None) or {})
    rope_type = scaling.get("rope_type", scaling.get("type"))
    extra: dict[str, np.ndarray] = {}
    if rope_type == "llama3":
        extra["rope_freqs.weight"] = np.array(_llama3_factors(cfg, rope_dim), dtype=np.float32)
    elif rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(scaling["factor"])
    elif rope_type == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(scaling["factor"])
        w.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
    elif rope_type in ("longrope", "su"):
        original = cfg.original_max_position_embeddings
        w.add_rope_scaling_orig_ctx_len(original)
        scale = cfg.max_position_embeddings / original
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)
        extra["rope_factors_long.weight"] = np.array(scaling["long_factor"], dtype=np.float32)
        extra["rope_factors_short.weight"] = np.array(scaling["short_factor"], dtype=np.float32)
    if kind == "phi3":
        w.add_sliding_window(cfg.sliding_window or 0)
    if kind.startswith("gemma"):
        w.add_sliding_window(cfg.sliding_window)
        if kind == "gemma2":
            w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
            w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    _add_tokenizer(w, chat_template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)
    tensors: dict[str, np.ndarray] = {}
    for hf_name, t in model.state_dict().items():
        data = t.detach().float().numpy()
        if kind.startswith("gemma") and hf_name == "lm_head.weight":
            continue  # tied: the converter skips it
        if cfg.tie_word_embeddings and hf_name == "lm_head.weight":
            continue
        if kind.startswith("gemma") and hf_name.endswith("norm.weight"):
            data = data + 1
        if arch == "llama" and hf_name.endswith("q_proj.weight"):
            data = _permute(data, heads)
        if arch == "llama" and hf_name.endswith("k_proj.weight"):
            data = _permute(data, kv)
        stem, suffix = hf_name.rsplit(".", 1)
        name = names.get_name(stem)
        assert name is not None, hf_name
        tensors[f"{name}.{suffix}"] = data
    tensors.update(extra)
    rng = np.random.default_rng(11)
    for name, data in tensors.items():
        if data.ndim == 2 and qtype in F16_FIELDS:  # gguf cannot write these: random valid blocks
            # llama.cpp falls back to other types where rows are not a multiple of 256; embeddings and output Q8_0
            fits = data.shape[1] % 256 == 0 and name not in ("token_embd.weight", "output.weight")
            kind_here = qtype if fits else QT.Q8_0
            w.add_tensor(name, random_blocks(data.shape, kind_here, rng), raw_dtype=kind_here)
        elif data.ndim == 2 and qtype != QT.F32:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, data.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _write_gpt2(model, path: Path, chat_template: str | None = CHATML) -> Path:
    """GPT-2: Conv1D weights transposed to (out, in); the tied head written again as `output`."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_name("tiny-gpt2")
    w.add_context_length(cfg.n_positions)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.n_inner or 4 * cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_head_count(cfg.n_head)
    w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    _add_tokenizer(w, chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, cfg.n_layer)
    for hf_name, t in model.state_dict().items():
        if hf_name.endswith(".attn.bias") or hf_name.endswith(".attn.masked_bias") or hf_name == "lm_head.weight":
            continue
        data = t.detach().float().numpy()
        if hf_name.endswith((".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")):
            data = np.ascontiguousarray(data.T)
        stem, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(stem)}.{suffix}"
        w.add_tensor(name, data)
        if name == "token_embd.weight":
            w.add_tensor("output.weight", data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _add_tokenizer(w: gguf.GGUFWriter, chat_template: str | None = CHATML) -> None:
    tok = make_tokenizer()
    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    specials = {t.content for t in tok.get_added_tokens_decoder().values()}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in specials else 1 for t, _ in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)
