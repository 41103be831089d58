"""ModernBERT (gte-modernbert, nomic-embed-text-v2... families): pre-norm, rotary, GeGLU, alternating
global and sliding-window attention, no biases by default, a final norm."""

from __future__ import annotations

from edge_infer.export.arch._common import Take, need, take
from edge_infer.export.encoders import EncoderSpec, activation_of, prefix_of


def spec(config: dict) -> EncoderSpec:
    hidden, heads = int(need(config, "hidden_size")), int(need(config, "num_attention_heads"))
    return EncoderSpec(
        model_type="modernbert", vocab_size=int(need(config, "vocab_size")), hidden_size=hidden,
        intermediate_size=int(need(config, "intermediate_size")), num_layers=int(need(config, "num_hidden_layers")),
        num_heads=heads, max_position_embeddings=int(need(config, "max_position_embeddings")),
        norm_eps=float(config.get("norm_eps", 1e-5)), activation=activation_of(config.get("hidden_activation", "gelu")),
        mlp="gated", norm_place="pre", position="rope", rope_theta=float(config.get("global_rope_theta", 160000.0)),
        rotary_dim=hidden // heads, local_rope_theta=config.get("local_rope_theta"),
        local_window=int(config.get("local_attention", 128)),
        global_every=int(config.get("global_attn_every_n_layers", 3)), pad_token_id=config.get("pad_token_id"))


def recipe(s: EncoderSpec, names: set[str]) -> dict[str, Take]:
    p = prefix_of(names, "embeddings.tok_embeddings.weight", ("model.",))
    r: dict[str, Take] = {"embed.weight": take(p + "embeddings.tok_embeddings.weight")}
    norms = {"embed_norm": p + "embeddings.norm", "final_norm": p + "final_norm"}
    for i in range(s.num_layers):
        L, c = f"{p}layers.{i}.", f"layers.{i}."
        r[c + "qkv.weight"] = take(L + "attn.Wqkv.weight")
        r[c + "o.weight"] = take(L + "attn.Wo.weight")
        r[c + "gate_up.weight"] = take(L + "mlp.Wi.weight")  # (input rows, then gate rows): act(input) * gate
        r[c + "down.weight"] = take(L + "mlp.Wo.weight")
        norms[c + "ffn_norm"] = L + "mlp_norm"
        if L + "attn_norm.weight" in names:  # layer 0 has none (nn.Identity)
            norms[c + "attn_norm"] = L + "attn_norm"
        for ours, theirs in (("qkv", "attn.Wqkv"), ("o", "attn.Wo"), ("gate_up", "mlp.Wi"), ("down", "mlp.Wo")):
            if f"{L}{theirs}.bias" in names:
                r[f"{c}{ours}.bias"] = take(f"{L}{theirs}.bias")
    for ours, theirs in norms.items():
        r[ours + ".weight"] = take(theirs + ".weight")
        if theirs + ".bias" in names:
            r[ours + ".bias"] = take(theirs + ".bias")
    return r
