"""Write a big llama-shaped test model twice: an fp16 Hugging Face folder and a Q4_0 GGUF, same weights.

The default geometry is Llama-3.2-1B's (16 layers, hidden 2048, 32 heads / 8 KV heads, head_dim 64,
FFN 8192, tied embeddings) with SmolLM2's 49152-token vocabulary and seeded random weights. Rope is
plain (theta 500000, no llama3 scaling) so both routes read it today. The vocabulary, merges and chat
template come from the default model's GGUF (the project rebuilds tokenizer.json from it).

Both files are written one tensor at a time: each weight is drawn from its own seeded generator (the
seed and the tensor name), rounded to fp16, then appended to the safetensors file and, quantized to
Q4_0 with `gguf.quants.quantize`, to the GGUF. Peak memory is one tensor (the embedding, 400 MB in
fp32 at this geometry), not the model.

    python benchmarks/big_model.py OUT_DIR                    # 1B-class: OUT_DIR/hf, OUT_DIR/model.Q4_0.gguf
    python benchmarks/big_model.py OUT_DIR --layers 2 --hidden 256 --ffn 512 --heads 4 --kv-heads 2
    python benchmarks/big_model.py OUT_DIR --qwen2-1.5b       # OUT_DIR/qwen2-1.5b.Q4_K_M.gguf (1.0 GB)

`--qwen2-1.5b` writes a GGUF with Qwen2.5-1.5B-Instruct's geometry and llama.cpp's Q4_K_M tensor
types instead (qwen2: 28 layers, hidden 1536, 12 heads / 2 KV heads, head_dim 128, FFN 8960, vocab
151936, tied embeddings, rope theta 1e6, q/k/v biases): Q4_K matrices, Q6_K for attn_v and ffn_down
where llama.cpp's `use_more_bits` says so (14 of 28 layers each), the tied token_embd Q6_K, norms
and biases F32. K-quant blocks are random bytes with small f16 scales (valid, not a trained model);
the 151936-entry byte-level BPE vocabulary is SmolLM2's extended with synthetic merges, then
Qwen's 22 special tokens and llama.cpp's [PAD] entries up to the embedding's rows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Geometry:
    layers: int = 16
    hidden: int = 2048
    heads: int = 32
    kv_heads: int = 8
    ffn: int = 8192
    vocab: int = 49152  # SmolLM2's; smaller values keep the first `vocab` tokens (and their merges)
    context: int = 8192
    rope_theta: float = 500000.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensors(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(HF name, GGUF name, numpy shape) of every weight, in file order."""
        h, kv, f = self.hidden, self.kv_heads * self.head_dim, self.ffn
        out = [("model.embed_tokens.weight", "token_embd.weight", (self.vocab, h))]
        for i in range(self.layers):
            hf, gg = f"model.layers.{i}.", f"blk.{i}."
            out += [
                (hf + "input_layernorm.weight", gg + "attn_norm.weight", (h,)),
                (hf + "self_attn.q_proj.weight", gg + "attn_q.weight", (h, h)),
                (hf + "self_attn.k_proj.weight", gg + "attn_k.weight", (kv, h)),
                (hf + "self_attn.v_proj.weight", gg + "attn_v.weight", (kv, h)),
                (hf + "self_attn.o_proj.weight", gg + "attn_output.weight", (h, h)),
                (hf + "post_attention_layernorm.weight", gg + "ffn_norm.weight", (h,)),
                (hf + "mlp.gate_proj.weight", gg + "ffn_gate.weight", (f, h)),
                (hf + "mlp.up_proj.weight", gg + "ffn_up.weight", (f, h)),
                (hf + "mlp.down_proj.weight", gg + "ffn_down.weight", (h, f)),
            ]
        out.append(("model.norm.weight", "output_norm.weight", (h,)))
        return out

    def n_params(self) -> int:
        return sum(int(np.prod(s)) for _, _, s in self.tensors())



def add_metadata(w, meta: dict) -> None:
    """Write GGUF key/values, each with the type its Python value implies (bool, uint32, string, array)."""
    for key, value in meta.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)

def weight(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """The fp16 weight `name`: its own generator, so the two files agree without holding the model."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    if len(shape) == 1:  # norm multipliers around 1
        return rng.uniform(0.8, 1.2, shape).astype(np.float16)
    # std 0.02 like an initialised checkpoint; the embedding a bit larger so logits are not flat
    std = 0.05 if "embed" in name else 0.02
    return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float16)


def llama_permutation(rows: int, n_head: int) -> np.ndarray:
    """llama.cpp's converter stores q/k rows per head as (half, 2) where HF has (2, half):
    gguf[order] = hf with the order edge-infer (and transformers) use to read it back."""
    half = rows // n_head // 2
    return np.arange(rows).reshape(n_head, half, 2).swapaxes(1, 2).reshape(rows)


def config_json(g: Geometry, bos: int | None, eos: int | None) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": g.vocab,
        "hidden_size": g.hidden, "intermediate_size": g.ffn, "num_hidden_layers": g.layers,
        "num_attention_heads": g.heads, "num_key_value_heads": g.kv_heads, "head_dim": g.head_dim,
        "hidden_act": "silu", "max_position_embeddings": g.context, "rms_norm_eps": 1e-5,
        "rope_theta": g.rope_theta, "rope_scaling": None, "tie_word_embeddings": True,
        "attention_bias": False, "mlp_bias": False, "bos_token_id": bos, "eos_token_id": eos,
        "torch_dtype": "float16",
    }


def tokenizer_metadata(vocab: int) -> dict:
    """The default model's tokenizer.* GGUF keys, cut to the first `vocab` tokens."""
    from edge_infer.export.gguf_file import read_gguf
    from edge_infer.export.sources import default_model_path

    meta = {k: v for k, v in read_gguf(default_model_path()).metadata.items() if k.startswith("tokenizer.")}
    tokens = meta["tokenizer.ggml.tokens"]
    if vocab < len(tokens):
        keep = set(tokens[:vocab])
        meta["tokenizer.ggml.tokens"] = tokens[:vocab]
        meta["tokenizer.ggml.token_type"] = meta["tokenizer.ggml.token_type"][:vocab]
        merges = [m for m in meta["tokenizer.ggml.merges"] if "".join(m.split(" ")) in keep
                  and all(p in keep for p in m.split(" "))]
        meta["tokenizer.ggml.merges"] = merges
    elif vocab > len(tokens):
        raise SystemExit(f"--vocab {vocab} exceeds the default model's {len(tokens)} tokens")
    return meta


def write_hf(folder: Path, g: Geometry, seed: int, meta: dict) -> None:
    from edge_infer.export.gguf_tokenizer import tokenizer_from_gguf

    folder.mkdir(parents=True, exist_ok=True)
    tok, info = tokenizer_from_gguf(meta)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": info.bos_token, "eos_token": info.eos_token, "chat_template": info.chat_template,
        "add_bos_token": False, "model_max_length": g.context, "tokenizer_class": "GPT2Tokenizer"}, indent=1))
    (folder / "config.json").write_text(json.dumps(config_json(g, info.bos_id, info.eos_id), indent=1))
    # safetensors: u64 header length, JSON header (dtype, shape, byte range per tensor), then the bytes.
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, _, shape in g.tensors():
        size = int(np.prod(shape)) * 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name, _, shape in g.tensors():
            f.write(weight(name, shape, seed).tobytes())


def write_gguf(path: Path, g: Geometry, seed: int, meta: dict) -> None:
    import gguf

    qt = gguf.GGMLQuantizationType
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("big-model")
    for key, value in {"block_count": g.layers, "context_length": g.context, "embedding_length": g.hidden,
                       "feed_forward_length": g.ffn, "attention.head_count": g.heads,
                       "attention.head_count_kv": g.kv_heads, "rope.dimension_count": g.head_dim,
                       "vocab_size": g.vocab}.items():
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32("llama.rope.freq_base", g.rope_theta)
    w.add_uint32("general.file_type", 2)  # MOSTLY_Q4_0
    add_metadata(w, meta)
    plan = []
    for name, gname, shape in g.tensors():
        qtype = qt.Q4_0 if len(shape) == 2 else qt.F32
        nbytes = int(np.prod(shape)) * 4 if qtype == qt.F32 else int(np.prod(shape)) // 32 * 18
        plan.append((name, gname, shape, qtype))
        byte_shape = shape if qtype == qt.F32 else shape[:-1] + (shape[-1] // 32 * 18,)  # Q4_0: 18 bytes a block
        w.add_tensor_info(gname, byte_shape, np.dtype(np.float32) if qtype == qt.F32 else np.dtype(np.uint8),
                          nbytes, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, gname, shape, qtype in plan:
        data = weight(name, shape, seed).astype(np.float32)
        if gname.endswith(("attn_q.weight", "attn_k.weight")):
            heads = g.heads if "attn_q" in gname else g.kv_heads
            permuted = np.empty_like(data)
            permuted[llama_permutation(shape[0], heads)] = data
            data = permuted
        w.write_tensor_data(data if qtype == qt.F32 else gguf.quants.quantize(data, qtype))
    w.close()


QWEN2_1_5B = Geometry(layers=28, hidden=1536, heads=12, kv_heads=2, ffn=8960, vocab=151936, context=32768,
                      rope_theta=1000000.0)
QWEN2_REGULAR = 151643  # Qwen2.5's ordinary tokens; 22 specials follow, then padding rows
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
                  "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                  "<|repo_name|>", "<|file_sep|>"]
QWEN2_CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                "{% endif %}")


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of the layers whose attn_v / ffn_down get Q6_K in a Q4_K_M file."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def qwen2_tokenizer_metadata(vocab: int) -> dict:
    """tokenizer.* keys of a qwen2-style byte-level BPE with `vocab` entries: SmolLM2's ordinary
    tokens and merges, synthetic merges (pairs of its first tokens) up to 151643 ordinary tokens,
    Qwen's specials (CONTROL) and `[PAD<i>]` entries (UNUSED) up to `vocab`, as llama.cpp's converter pads."""
    small = tokenizer_metadata(49152)
    base = [t for t, ty in zip(small["tokenizer.ggml.tokens"], small["tokenizer.ggml.token_type"]) if ty == 1]
    merges = list(small["tokenizer.ggml.merges"])
    tokens = list(base)
    seen = set(tokens)
    first = base[:600]
    for a in first:
        for b in first:
            if len(tokens) >= QWEN2_REGULAR:
                break
            if a + b not in seen:
                seen.add(a + b)
                tokens.append(a + b)
                merges.append(f"{a} {b}")
    assert len(tokens) == QWEN2_REGULAR, len(tokens)
    types = [1] * len(tokens) + [3] * len(QWEN2_SPECIALS)
    tokens += QWEN2_SPECIALS
    pads = [f"[PAD{i}]" for i in range(len(tokens), vocab)]
    tokens += pads
    types += [5] * len(pads)
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.eos_token_id": QWEN2_REGULAR + 2, "tokenizer.ggml.padding_token_id": QWEN2_REGULAR,
            "tokenizer.ggml.bos_token_id": QWEN2_REGULAR, "tokenizer.ggml.add_bos_token": False,
            "tokenizer.chat_template": QWEN2_CHATML}


def kquant_blocks(rng: np.random.Generator, shape: tuple[int, ...], qtype) -> np.ndarray:
    """Random but valid Q4_K / Q6_K blocks: random bytes, f16 scales small enough that the weights
    stay within about +-0.04 (Q4_K: d and dmin at bytes 0 and 2; Q6_K: d at byte 208)."""
    import gguf
    from gguf.constants import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    n, k = shape
    raw = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    fields = {gguf.GGMLQuantizationType.Q4_K: ((0, 1e-5, 4e-5), (2, 1e-5, 4e-5)),
              gguf.GGMLQuantizationType.Q6_K: ((208, 2e-6, 1e-5),)}[qtype]
    for pos, lo, hi in fields:
        raw[..., pos:pos + 2] = rng.uniform(lo, hi, (n, k // block)).astype(np.float16).view(np.uint8).reshape(
            n, k // block, 2)
    return raw.reshape(n, -1)


def write_qwen2_kquant_gguf(path: Path, g: Geometry, seed: int) -> None:
    """A Q4_K_M-typed qwen2 GGUF of geometry `g` (see the module docstring), one tensor at a time."""
    import gguf
    from gguf.constants import GGML_QUANT_SIZES

    qt = gguf.GGMLQuantizationType
    h, kv, f = g.hidden, g.kv_heads * g.head_dim, g.ffn
    plan: list[tuple[str, tuple[int, ...], object]] = [("token_embd.weight", (g.vocab, h), qt.Q6_K)]
    for i in range(g.layers):
        b, more = f"blk.{i}.", use_more_bits(i, g.layers)
        plan += [(b + "attn_norm.weight", (h,), qt.F32),
                 (b + "attn_q.weight", (h, h), qt.Q4_K), (b + "attn_q.bias", (h,), qt.F32),
                 (b + "attn_k.weight", (kv, h), qt.Q4_K), (b + "attn_k.bias", (kv,), qt.F32),
                 (b + "attn_v.weight", (kv, h), qt.Q6_K if more else qt.Q4_K), (b + "attn_v.bias", (kv,), qt.F32),
                 (b + "attn_output.weight", (h, h), qt.Q4_K),
                 (b + "ffn_norm.weight", (h,), qt.F32),
                 (b + "ffn_gate.weight", (f, h), qt.Q4_K), (b + "ffn_up.weight", (f, h), qt.Q4_K),
                 (b + "ffn_down.weight", (h, f), qt.Q6_K if more else qt.Q4_K)]
    plan.append(("output_norm.weight", (h,), qt.F32))
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("qwen2-1.5b-geometry-random")
    for key, value in {"block_count": g.layers, "context_length": g.context, "embedding_length": h,
                       "feed_forward_length": f, "attention.head_count": g.heads,
                       "attention.head_count_kv": g.kv_heads}.items():
        w.add_uint32(f"qwen2.{key}", value)
    w.add_float32("qwen2.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32("qwen2.rope.freq_base", g.rope_theta)
    w.add_uint32("general.file_type", 15)  # MOSTLY_Q4_K_M
    add_metadata(w, qwen2_tokenizer_metadata(g.vocab))
    for name, shape, qtype in plan:
        if qtype == qt.F32:
            w.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4, raw_dtype=qtype)
        else:
            block, size = GGML_QUANT_SIZES[qtype]  # type: ignore[index]
            byte_shape = (shape[0], shape[1] // block * size)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape, qtype in plan:
        digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        if qtype != qt.F32:
            w.write_tensor_data(kquant_blocks(rng, shape, qtype))
        elif name.endswith("norm.weight"):
            w.write_tensor_data(rng.uniform(0.8, 1.2, shape).astype(np.float32))
        else:  # q/k/v biases
            w.write_tensor_data((rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32))
    w.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    d = Geometry()
    for field in ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "context"):
        p.add_argument("--" + field.replace("_", "-"), type=int, default=getattr(d, field))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=("hf", "gguf"), default=None)
    p.add_argument("--qwen2-1.5b", dest="qwen2", action="store_true",
                   help="write OUT/qwen2-1.5b.Q4_K_M.gguf (Qwen2.5-1.5B's geometry, llama.cpp's Q4_K_M types) only")
    a = p.parse_args(argv)
    if a.qwen2:
        a.out.mkdir(parents=True, exist_ok=True)
        print(f"{QWEN2_1_5B.n_params() / 1e6:.0f}M parameters (without biases): {QWEN2_1_5B}")
        write_qwen2_kquant_gguf(a.out / "qwen2-1.5b.Q4_K_M.gguf", QWEN2_1_5B, a.seed)
        print(f"wrote {a.out / 'qwen2-1.5b.Q4_K_M.gguf'}")
        return
    g = Geometry(a.layers, a.hidden, a.heads, a.kv_heads, a.ffn, a.vocab, a.context)
    a.out.mkdir(parents=True, exist_ok=True)
    meta = tokenizer_metadata(g.vocab)
    print(f"{g.n_params() / 1e6:.0f}M parameters: {g}")
    if a.only in (None, "hf"):
        write_hf(a.out / "hf", g, a.seed, meta)
        print(f"wrote {a.out / 'hf'}")
    if a.only in (None, "gguf"):
        write_gguf(a.out / "model.Q4_0.gguf", g, a.seed, meta)
        print(f"wrote {a.out / 'model.Q4_0.gguf'}")


if __name__ == "__main__":
    main()
