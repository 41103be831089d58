"""NomicBERT (nomic-embed-text-v1/v1.5): BERT's post-norm with rotary positions and a SwiGLU MLP.

transformers has no config class for it (the checkpoints ship their own modeling code, run with
trust_remote_code), so the config is read from config.json's own keys (n_embd, n_head, ...).
Dynamic NTK rope scaling (rotary_scaling_factor, for texts past 2048 tokens) is not applied:
texts are limited to the trained context.
"""

from __future__ import annotations

from edge_infer.contract.errors import ModelFileError
from edge_infer.export.arch._common import Take, need, take
from edge_infer.export.encoders import EncoderSpec, activation_of, prefix_of


def spec(config: dict) -> EncoderSpec:
    if config.get("prenorm") or config.get("rotary_emb_interleaved"):
        raise ModelFileError("config.json: NomicBERT with prenorm or interleaved rotary is not supported")
    hidden, heads = int(need(config, "n_embd")), int(need(config, "n_head"))
    act = activation_of(config.get("activation_function", "swiglu"))
    return EncoderSpec(
        model_type="nomic_bert", vocab_size=int(need(config, "vocab_size")), hidden_size=hidden,
        intermediate_size=int(config.get("n_inner") or 4 * hidden), num_layers=int(need(config, "n_layer")),
        num_heads=heads, max_position_embeddings=int(config.get("n_positions", 2048)),
        norm_eps=float(config.get("layer_norm_epsilon", 1e-12)), activation=act,
        mlp="gated" if config.get("activation_function", "swiglu") in ("swiglu", "geglu") else "plain",
        norm_place="post", position="rope", rope_theta=float(config.get("rotary_emb_base", 10000.0)),
        rotary_dim=int(hidden // heads * float(config.get("rotary_emb_fraction", 1.0))),
        pad_token_id=config.get("pad_token_id"))


def recipe(s: EncoderSpec, names: set[str]) -> dict[str, Take]:
    p = prefix_of(names, "embeddings.word_embeddings.weight", ("bert.", "model."))
    r: dict[str, Take] = {"embed.weight": take(p + "embeddings.word_embeddings.weight"),
                          "embed_norm.weight": take(p + "emb_ln.weight"), "embed_norm.bias": take(p + "emb_ln.bias")}
    if p + "embeddings.token_type_embeddings.weight" in names:
        r["embed_type.weight"] = take(p + "embeddings.token_type_embeddings.weight", transform=lambda w: w[0])
    for i in range(s.num_layers):
        L, c = f"{p}encoder.layers.{i}.", f"layers.{i}."
        mlp = {"gate_up": ("mlp.fc12", "mlp.fc11"), "down": ("mlp.fc2",)} if s.mlp == "gated" else \
            {"up": ("mlp.fc1",), "down": ("mlp.fc2",)}  # gated: silu(fc12(x)) * fc11(x), activated rows first
        parts = {"qkv": ("attn.Wqkv",), "o": ("attn.out_proj",), **mlp,
                 "attn_norm": ("norm1",), "ffn_norm": ("norm2",)}
        for ours, theirs in parts.items():
            r[f"{c}{ours}.weight"] = take(*(f"{L}{t}.weight" for t in theirs))
            if all(f"{L}{t}.bias" in names for t in theirs):
                r[f"{c}{ours}.bias"] = take(*(f"{L}{t}.bias" for t in theirs))
    return r
