"""BERT (all-MiniLM, bge, e5, gte): learned positions, token type 0 added, post-norm, plain GELU MLP."""

from __future__ import annotations

from edge_infer.export.arch._common import Take, need, take
from edge_infer.export.encoders import EncoderSpec, activation_of, prefix_of


def spec(config: dict, position_offset: int = 0, model_type: str = "bert") -> EncoderSpec:
    if config.get("position_embedding_type", "absolute") != "absolute":
        from edge_infer.contract.errors import ModelFileError

        raise ModelFileError(f"config.json: position_embedding_type '{config['position_embedding_type']}' is not "
                             "supported (absolute only)")
    return EncoderSpec(
        model_type=model_type, vocab_size=int(need(config, "vocab_size")), hidden_size=int(need(config, "hidden_size")),
        intermediate_size=int(need(config, "intermediate_size")), num_layers=int(need(config, "num_hidden_layers")),
        num_heads=int(need(config, "num_attention_heads")),
        max_position_embeddings=int(need(config, "max_position_embeddings")) - position_offset,
        norm_eps=float(config.get("layer_norm_eps", 1e-12)), activation=activation_of(config.get("hidden_act", "gelu")),
        mlp="plain", norm_place="post", position="learned", position_offset=position_offset,
        pad_token_id=config.get("pad_token_id"))


def recipe(s: EncoderSpec, names: set[str]) -> dict[str, Take]:
    p = prefix_of(names, "embeddings.word_embeddings.weight", ("bert.", "roberta.", "model."))
    e = p + "embeddings."
    r: dict[str, Take] = {
        "embed.weight": take(e + "word_embeddings.weight"),
        "embed_positions.weight": take(e + "position_embeddings.weight"),
        "embed_norm.weight": take(e + "LayerNorm.weight"), "embed_norm.bias": take(e + "LayerNorm.bias")}
    if e + "token_type_embeddings.weight" in names:
        r["embed_type.weight"] = take(e + "token_type_embeddings.weight", transform=lambda w: w[0])
    for i in range(s.num_layers):
        L, c = f"{p}encoder.layer.{i}.", f"layers.{i}."
        a = L + "attention."
        for kind in ("weight", "bias"):
            r[c + "qkv." + kind] = take(*(a + f"self.{n}.{kind}" for n in ("query", "key", "value")))
            r[c + "o." + kind] = take(a + f"output.dense.{kind}")
            r[c + "attn_norm." + kind] = take(a + f"output.LayerNorm.{kind}")
            r[c + "up." + kind] = take(L + f"intermediate.dense.{kind}")
            r[c + "down." + kind] = take(L + f"output.dense.{kind}")
            r[c + "ffn_norm." + kind] = take(L + f"output.LayerNorm.{kind}")
    return r
