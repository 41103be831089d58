"""Build an ONNX encoder graph (BERT, XLM-RoBERTa, ModernBERT, NomicBERT) from canonical weights.

    input_ids          (batch, sequence_length)          int64
    attention_mask     (batch, sequence_length)          int64, 1 = real token (padding anywhere)
  ->
    last_hidden_state  (batch, sequence_length, hidden)  float32

Standard ONNX ops only, so every execution provider runs it: attention is MatMul, an additive
mask and Softmax; linear layers are MatMuls named like the decoder's
(`/model/layers.0/attn/qkv_proj/MatMul`), so quantize.rewrite turns them into MatMulNBits, and the
token embedding is the decoder's `/model/embed_tokens/Gather` (quantized the same way). Pooling
and normalization happen in the runtime (runtime/embed.py), as the manifest's embedding record says.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper

from edge_infer.contract.io_names import ATTENTION_MASK, INPUT_IDS, LAST_HIDDEN_STATE
from edge_infer.export.encoders import EncoderSpec
from edge_infer.export.graph import MS, OPSET, GraphIO, _Builder, _linear, _param
from edge_infer.export.rope import cos_sin_cache
from edge_infer.export.spec import RopeSpec
from edge_infer.quantize.external import DataFile

MASKED = -1e9  # added to a masked score: exp() underflows to 0, and a fully masked row stays finite


def build_encoder(spec: EncoderSpec, weights: Mapping[str, np.ndarray],
                  store: DataFile | None = None) -> tuple[onnx.ModelProto, GraphIO]:
    b = _Builder(np.dtype(np.float32), store)
    inputs = [helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, ["batch", "sequence_length"]),
              helper.make_tensor_value_info(ATTENTION_MASK, TensorProto.INT64, ["batch", "sequence_length"])]
    outputs = [helper.make_tensor_value_info(LAST_HIDDEN_STATE, TensorProto.FLOAT,
                                             ["batch", "sequence_length", spec.hidden_size])]
    seq = b.one("Gather", [b.one("Shape", [INPUT_IDS], "/model/Shape"), b.const(1)], "/model/seq", axis=0)  # ()
    positions = b.one("Range", [b.const(0), seq, b.const(1)], "/model/positions")  # (sequence_length,)
    x = _embeddings(b, spec, weights, positions)  # (batch, sequence_length, hidden)
    pad_bias = _padding_bias(b)  # (batch, 1, 1, sequence_length)
    window_bias = _window_bias(b, spec, positions) if spec.local_window is not None else None
    ropes = _rope_tables(b, spec, positions)
    for i in range(spec.num_layers):
        p, w = f"/model/layers.{i}", f"layers.{i}."
        bias = pad_bias
        if spec.is_local(i):
            assert window_bias is not None  # is_local: a local window is set
            bias = b.one("Add", [pad_bias, window_bias], p + "/attn/window_bias")
        rope = ropes.get("local" if spec.is_local(i) and "local" in ropes else "global")
        if spec.norm_place == "post":
            x = _norm(b, weights, w + "attn_norm", b.one("Add", [x, _attention(b, spec, weights, i, x, bias, rope)],
                                                           p + "/attn/residual"), spec, p + "/attn_norm")
            x = _norm(b, weights, w + "ffn_norm", b.one("Add", [x, _mlp(b, spec, weights, i, x)],
                                                          p + "/mlp/residual"), spec, p + "/ffn_norm")
        else:
            h = _norm(b, weights, w + "attn_norm", x, spec, p + "/attn_norm") if w + "attn_norm.weight" in weights else x
            x = b.one("Add", [x, _attention(b, spec, weights, i, h, bias, rope)], p + "/attn/residual")
            h = _norm(b, weights, w + "ffn_norm", x, spec, p + "/ffn_norm")
            x = b.one("Add", [x, _mlp(b, spec, weights, i, h)], p + "/mlp/residual")
    if "final_norm.weight" in weights:
        x = _norm(b, weights, "final_norm", x, spec, "/model/norm")
    b.op("Identity", [x], "/model/output", outputs=[LAST_HIDDEN_STATE])
    graph = helper.make_graph(b.nodes, f"edge_infer_{spec.model_type}_encoder", inputs, outputs, initializer=b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                              producer_name="edge-infer")
    model.ir_version = 10
    return model, GraphIO((INPUT_IDS, ATTENTION_MASK), (LAST_HIDDEN_STATE,))


def _embeddings(b: _Builder, spec: EncoderSpec, weights, positions: str) -> str:
    embed = b.weight("model.embed_tokens.weight", weights["embed.weight"])
    x = b.one("Gather", [embed, INPUT_IDS], "/model/embed_tokens/Gather", axis=0)
    if spec.position == "learned":  # a right-padded row's real tokens sit at offset, offset + 1, ...
        at = b.one("Add", [positions, b.const(spec.position_offset)], "/model/embed_positions/offset")
        table = b.weight("model.embed_positions.weight", weights["embed_positions.weight"])
        x = b.one("Add", [x, b.one("Gather", [table, at], "/model/embed_positions/Gather", axis=0)],
                  "/model/embed_positions/Add")  # (batch, seq, hidden) + (seq, hidden)
    if "embed_type.weight" in weights:  # every token is of type 0: one constant row
        x = b.one("Add", [x, b.weight("model.embed_type.weight", weights["embed_type.weight"])], "/model/embed_type/Add")
    return _norm(b, weights, "embed_norm", x, spec, "/model/embed_norm")


def _padding_bias(b: _Builder) -> str:
    """0 where a key is a real token, MASKED where it is padding.  # (batch, 1, 1, sequence_length)"""
    m = b.one("Cast", [ATTENTION_MASK], "/model/attn_mask/Cast", to=TensorProto.FLOAT)
    bias = b.one("Mul", [b.one("Sub", [b.const(1.0, np.float32), m], "/model/attn_mask/Sub"),
                         b.const(MASKED, np.float32)], "/model/attn_mask/Mul")
    return b.one("Unsqueeze", [bias, b.const([1, 2])], "/model/attn_mask/Unsqueeze")


def _window_bias(b: _Builder, spec: EncoderSpec, positions: str) -> str:
    """MASKED where |query - key| > local_window // 2 (ModernBERT's sliding layers).  # (seq, seq)"""
    rows = b.one("Unsqueeze", [positions, b.const([1])], "/model/window/rows")
    cols = b.one("Unsqueeze", [positions, b.const([0])], "/model/window/cols")
    dist = b.one("Abs", [b.one("Sub", [rows, cols], "/model/window/Sub")], "/model/window/Abs")
    far = b.one("Greater", [dist, b.const(int(spec.local_window or 0) // 2)], "/model/window/far")
    return b.one("Where", [far, b.const(MASKED, np.float32), b.const(0.0, np.float32)], "/model/window/bias")


def _rope_tables(b: _Builder, spec: EncoderSpec, positions: str) -> dict[str, tuple[str, str]]:
    """cos and sin rows of this pass's positions, each (seq, rotary_dim) in rotate-half layout."""
    if spec.position != "rope":
        return {}
    thetas = {"global": spec.rope_theta}
    if spec.local_window is not None and spec.local_rope_theta is not None:
        thetas["local"] = float(spec.local_rope_theta)
    out = {}
    for kind, theta in thetas.items():
        cos, sin = cos_sin_cache(RopeSpec(theta=theta, rotary_dim=spec.rotary_dim), spec.max_position_embeddings)
        rows = [b.one("Gather", [b.weight(f"{n}_cache_{kind}", np.concatenate([t, t], axis=1)), positions],
                      f"/model/rope_{kind}/{n}", axis=0) for n, t in (("cos", cos), ("sin", sin))]
        out[kind] = (rows[0], rows[1])  # each (seq, rotary_dim) from (max_positions, rotary_dim) tables
    return out


def _rotate(b: _Builder, spec: EncoderSpec, x: str, rope: tuple[str, str], name: str) -> str:
    """x * cos + rotate_half(x) * sin over the first rotary_dim values of each head.  # (batch, heads, seq, head_dim)"""
    d, rest = spec.rotary_dim, spec.head_dim - spec.rotary_dim
    rot, keep = b.op("Split", [x, b.const([d, rest])], name + "/split", n_out=2, axis=-1) if rest else (x, "")
    lo, hi = b.op("Split", [rot, b.const([d // 2, d // 2])], name + "/halves", n_out=2, axis=-1)
    turned = b.one("Concat", [b.one("Neg", [hi], name + "/Neg"), lo], name + "/rotate_half", axis=-1)
    y = b.one("Add", [b.one("Mul", [rot, rope[0]], name + "/cos"), b.one("Mul", [turned, rope[1]], name + "/sin")],
              name + "/Add")
    return b.one("Concat", [y, keep], name + "/join", axis=-1) if rest else y


def _attention(b: _Builder, spec: EncoderSpec, weights, i: int, h: str, bias: str, rope) -> str:
    p, w = f"/model/layers.{i}/attn", f"layers.{i}."
    qkv = _linear(b, weights, w + "qkv", h, p + "/qkv_proj", w + "qkv.bias" in weights)  # (batch, seq, 3 * hidden)
    qkv = b.one("Reshape", [qkv, b.const([0, 0, 3, spec.num_heads, spec.head_dim])], p + "/Reshape")
    qkv = b.one("Transpose", [qkv], p + "/Transpose", perm=[2, 0, 3, 1, 4])  # (3, batch, heads, seq, head_dim)
    q, k, v = (b.one("Squeeze", [t, b.const([0])], f"{p}/{n}")
               for t, n in zip(b.op("Split", [qkv], p + "/qkv_split", n_out=3, axis=0, num_outputs=3), "qkv"))
    if rope is not None:
        q, k = _rotate(b, spec, q, rope, p + "/q_rope"), _rotate(b, spec, k, rope, p + "/k_rope")
    kt = b.one("Transpose", [k], p + "/k_T", perm=[0, 1, 3, 2])
    scores = b.one("MatMul", [q, kt], p + "/scores")  # (batch, heads, seq, seq)
    scores = b.one("Add", [b.one("Mul", [scores, b.const(spec.head_dim ** -0.5, np.float32)], p + "/scale"), bias],
                   p + "/masked")
    ctx = b.one("MatMul", [b.one("Softmax", [scores], p + "/Softmax", axis=-1), v], p + "/context")
    ctx = b.one("Transpose", [ctx], p + "/context_T", perm=[0, 2, 1, 3])  # (batch, seq, heads, head_dim)
    ctx = b.one("Reshape", [ctx, b.const([0, 0, spec.hidden_size])], p + "/merge")
    return _linear(b, weights, w + "o", ctx, p + "/o_proj", w + "o.bias" in weights)


def _mlp(b: _Builder, spec: EncoderSpec, weights, i: int, h: str) -> str:
    p, w = f"/model/layers.{i}/mlp", f"layers.{i}."
    if spec.mlp == "gated":
        gu = _linear(b, weights, w + "gate_up", h, p + "/gate_up_proj", w + "gate_up.bias" in weights)
        n = spec.intermediate_size
        gate, up = b.op("Split", [gu, b.const([n, n])], p + "/gate_up_split", n_out=2, axis=-1)
        y = b.one("Mul", [_act(b, spec, gate, p + "/act"), up], p + "/gate_mul")
    else:
        y = _act(b, spec, _linear(b, weights, w + "up", h, p + "/up_proj", w + "up.bias" in weights), p + "/act")
    return _linear(b, weights, w + "down", y, p + "/down_proj", w + "down.bias" in weights)


def _act(b: _Builder, spec: EncoderSpec, x: str, name: str) -> str:
    if spec.activation == "silu":
        return b.one("Mul", [x, b.one("Sigmoid", [x], name + "/Sigmoid")], name + "/Mul")
    return b.one("Gelu", [x], name + "/Gelu", approximate="tanh" if spec.activation == "gelu_tanh" else "none")


def _norm(b: _Builder, weights, key: str, x: str, spec: EncoderSpec, name: str) -> str:
    gamma = b.weight(_param(key), weights[key + ".weight"])
    beta = weights[key + ".bias"] if key + ".bias" in weights else np.zeros(spec.hidden_size, np.float32)
    return b.one("LayerNormalization", [x, gamma, b.weight(_param(key, "bias"), beta)], name + "/LayerNorm",
                 axis=-1, epsilon=spec.norm_eps)
