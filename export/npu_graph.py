"""Standard-op, static-shape decoder graphs for accelerators (the `npu` export profile).

NPU providers (OpenVINO, QNN, CoreML) run standard ONNX ops only and compile
fixed shapes. So this builder uses no `com.microsoft` op and no dynamic shape
arithmetic, and makes two graphs over one set of weights:

    prefill chunk graph   sequence_length = chunk (e.g. 64)
    decode graph          sequence_length = 1

Each graph, with P = max_length (the fixed KV-cache length) and S its sequence length:
    input_ids       (1, S)        int64  a chunk of the prompt, left-padded when short
    attention_mask  (1, P + S)    int64  1 = attend: [cached positions | new positions]
    position_ids    (1, S)        int64  rotary positions of the new tokens
    past_key_values.{i}.key / .value  (1, kv_heads, P, head_dim)  the whole cache, read only
  ->
    logits          (1, 1, vocab) float32, the last position only
    present.{i}.key / .value  (1, kv_heads, S, head_dim)  the new tokens' keys and values

The runtime writes `present` into its cache at the cache offset (runtime/static_plan.py).
Attention reads the cache and the new keys separately (two MatMuls, one softmax over
both), so the graph never copies the P-long cache. Padding slots carry mask 0 in the new
part; a causal constant orders the new tokens among themselves.

Pieces, all standard ONNX (opset 21):
  * RMSNorm: ReduceMean(x * x) -> Add eps -> Sqrt -> Reciprocal -> Mul;
  * rotary: cos/sin tables (max_length, head_dim) as initializers, Gathered by position_ids,
    rotate-half by Split/Neg/Concat;
  * grouped-query attention: the query heads of one kv head are stacked along the sequence
    axis, (1, kv_heads, group * S, head_dim), so nothing repeats the keys; every tensor is 4-D;
  * int4 / int8 weights: DequantizeLinear with block_size feeding MatMul (int4: uint4 with
    zero points and searched scales, as the default export rounds; int8: symmetric); the
    embedding gather stays float, the lm_head is int8 blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from edge_infer.export.graph import initializer_name
from edge_infer.quantize.nbits import pack_bits, quantize_absmax
from edge_infer.export.rope import cos_sin_cache
from edge_infer.export.spec import DecoderSpec
from edge_infer.contract.errors import UserError
from edge_infer.contract.io_names import ATTENTION_MASK, INPUT_IDS, KV_KINDS, LOGITS, POSITION_IDS, past, past_pair, present
from onnx import TensorProto, helper, numpy_helper

OPSET = 21
NPU_WEIGHTS = ("fp32", "int8", "int4")
NEG = -1e9  # additive mask: finite, so a fully masked padding row stays NaN-free
SHARED_PREFIXES = ("model.", "lm_head.", "rope.")  # initializers both graphs read from one data file


@dataclass(frozen=True)
class StaticShape:
    max_length: int  # P: cache positions
    sequence_length: int  # S: new tokens per pass
    lookup: str = "gather"  # table rows by "gather", or "onehot" (Equal + MatMul) for providers without Gather


def check_supported(spec: DecoderSpec, max_length: int) -> None:
    """Refuse, with the reason, what the standard-op builder does not do yet."""
    why = []
    if spec.position != "rope" or spec.rope is None:
        why.append("learned positions")
    elif spec.rope.rotary_dim != spec.head_dim:
        why.append("partial rotary")
    if spec.attn_softcap is not None or spec.final_softcap is not None:
        why.append("logit softcapping")
    if spec.local_rope is not None:
        why.append("a second rope for local layers")
    windowed = not spec.layer_types or "sliding" in spec.layer_types
    if spec.sliding_window and spec.sliding_window < max_length and windowed:
        why.append(f"sliding-window attention (window {spec.sliding_window} < max_length {max_length}; "
                   f"export with --max-length {spec.sliding_window} or less)")
    if why:
        raise UserError(f"--profile npu does not support {spec.model_type} yet: {', '.join(why)}; "
                        "use the default profile for this model")


class WeightBank:
    """Float weights turned into initializers once, so both graphs get identical tensors."""

    def __init__(self, weights: dict[str, np.ndarray], fmt: str, block_size: int):
        if fmt not in NPU_WEIGHTS:
            raise UserError(f"--quant {fmt} is not available with --profile npu (use {', '.join(NPU_WEIGHTS)})")
        self.weights, self.fmt, self.block_size = weights, fmt, block_size
        self._made: dict[str, list[onnx.TensorProto]] = {}
        self.quantized = 0

    def plain(self, name: str, array: np.ndarray) -> list[onnx.TensorProto]:
        if name not in self._made:
            self._made[name] = [numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name)]
        return self._made[name]

    def linear(self, name: str, w_in_out: np.ndarray, bits: int | None) -> tuple[list[onnx.TensorProto], bool]:
        """Initializers of a (in, out) weight; True when they need a DequantizeLinear."""
        if name in self._made:
            return self._made[name], len(self._made[name]) > 1
        k = w_in_out.shape[0]
        if bits is None or k % self.block_size:
            return self.plain(name, w_in_out), False
        if bits == 4:  # searched scales and uint4 zero points, as the default int4 export rounds
            from edge_infer.quantize.search import quantize_search

            ql = quantize_search(w_in_out.T, 4, self.block_size, symmetric=False)  # q (N, K), scales (N, K / block)
            assert ql.zero_points is not None  # asymmetric
            self._made[name] = [_int_tensor(name + ".q", ql.q.T, TensorProto.UINT4),  # (K, N)
                                numpy_helper.from_array(np.ascontiguousarray(ql.scales.T), name + ".scale"),
                                _int_tensor(name + ".zero_point", ql.zero_points.T, TensorProto.UINT4)]
        else:
            q, scale = quantize_absmax(w_in_out.T, bits, self.block_size)  # (N, K), (N, K / block)
            self._made[name] = [_int_tensor(name + ".q", q.T, TensorProto.INT8),  # (K, N)
                                numpy_helper.from_array(np.ascontiguousarray(scale.T), name + ".scale")]
        self.quantized += 1
        return self._made[name], True


def _int_tensor(name: str, q: np.ndarray, onnx_type: int) -> onnx.TensorProto:
    """An INT8 tensor, or a packed INT4 / UINT4 one, of the integer array q."""
    if onnx_type == TensorProto.INT8:
        return numpy_helper.from_array(np.ascontiguousarray(q, dtype=np.int8), name)
    packed = pack_bits(np.ascontiguousarray(q).reshape(-1).astype(np.int16) & 0x0F, 4)  # low nibbles
    t = TensorProto()
    t.name, t.data_type = name, onnx_type
    t.dims.extend(q.shape)
    t.raw_data = packed.tobytes()
    return t


class _Graph:
    """Nodes and initializers of one static graph; node names read as paths."""

    def __init__(self, bank: WeightBank):
        self.bank = bank
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, onnx.TensorProto] = {}
        self._n = 0

    def add(self, tensors: list[onnx.TensorProto]) -> str:
        for t in tensors:
            self.inits.setdefault(t.name, t)
        return tensors[0].name

    def const(self, value, dtype=np.int64) -> str:
        a = np.asarray(value, dtype=dtype)
        name = f"const.{self._n}"
        self._n += 1
        self.inits[name] = numpy_helper.from_array(a, name)
        return name

    def op(self, op_type: str, inputs: list[str], name: str, n_out: int = 1,
           outputs: list[str] | None = None, **attrs) -> list[str]:
        outs = outputs or [f"{name}/output_{k}" for k in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, **attrs))
        return outs

    def one(self, op_type: str, inputs: list[str], name: str, **kw) -> str:
        return self.op(op_type, inputs, name, **kw)[0]

    def linear(self, key: str, x: str, name: str, bias: bool, bits: int | None) -> str:
        w = self.bank.weights[key + ".weight"].T  # (in, out)
        tensors, quantized = self.bank.linear(initializer_name(f"{key}.weight"), w, bits)
        self.add(tensors)
        if quantized:
            wq = self.one("DequantizeLinear", [t.name for t in tensors], name + "/DequantizeLinear",
                          axis=0, block_size=self.bank.block_size)  # (in, out) float32
        else:
            wq = tensors[0].name
        y = self.one("MatMul", [x, wq], name + "/MatMul")
        if bias:
            b = self.add(self.bank.plain(f"model.{key}.bias", self.bank.weights[key + ".bias"]))
            y = self.one("Add", [y, b], name + "/Add")
        return y


def build_static_decoder(spec: DecoderSpec, bank: WeightBank, shape: StaticShape) -> onnx.ModelProto:
    """One static graph (see the module docstring) of `spec`, weights from `bank`."""
    g = _Graph(bank)
    P, S = shape.max_length, shape.sequence_length
    kv, hd, heads = spec.num_kv_heads, spec.head_dim, spec.num_heads
    bits = {"fp32": None, "int8": 8, "int4": 4}[bank.fmt]
    inputs = [helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, [1, S]),
              helper.make_tensor_value_info(ATTENTION_MASK, TensorProto.INT64, [1, P + S]),
              helper.make_tensor_value_info(POSITION_IDS, TensorProto.INT64, [1, S])]
    outputs = [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, [1, 1, spec.vocab_size])]
    for i in range(spec.num_layers):
        for kind in KV_KINDS:
            inputs.append(helper.make_tensor_value_info(past(i, kind), TensorProto.FLOAT, [1, kv, P, hd]))
            outputs.append(helper.make_tensor_value_info(present(i, kind), TensorProto.FLOAT, [1, kv, S, hd]))

    # Additive mask (1, 1, group * S, P + S): the caller's mask, and causal order among the new tokens,
    # in arithmetic (QNN's HTP refuses Where): (allowed - 1) * 1e9 with allowed in {0, 1}.
    causal = np.ones((S, P + S), dtype=np.float32)
    causal[:, P:] = np.tril(np.ones((S, S), dtype=np.float32))
    allowed = g.one("Cast", [ATTENTION_MASK], "/model/attn_mask/Cast", to=TensorProto.FLOAT)  # (1, P + S)
    allowed = g.one("Mul", [allowed, g.const(causal, np.float32)], "/model/attn_mask/Mul_causal")  # (S, P + S)
    bias = g.one("Mul", [g.one("Sub", [allowed, g.const(1.0, np.float32)], "/model/attn_mask/Sub"),
                         g.const(-NEG, np.float32)], "/model/attn_mask/Mul_big")
    group = heads // kv
    if group > 1:
        bias = g.one("Tile", [bias, g.const([group, 1])], "/model/attn_mask/Tile")  # (group * S, P + S)
    bias = g.one("Unsqueeze", [bias, g.const([0, 1])], "/model/attn_mask/Unsqueeze")  # (1, 1, group * S, P + S)

    # Rotary tables gathered by position: (1, 1, S, head_dim) each.
    assert spec.rope is not None, "check_supported refuses models without rotary positions"
    cos, sin = cos_sin_cache(spec.rope, P)  # (P, head_dim / 2)
    cos_t = g.add(bank.plain("rope.cos", np.concatenate([cos, cos], axis=-1)))  # (P, head_dim)
    sin_t = g.add(bank.plain("rope.sin", np.concatenate([sin, sin], axis=-1)))
    rope = tuple(g.one("Unsqueeze", [_lookup(g, t, POSITION_IDS, P, f"/model/rope/{n}", shape.lookup),
                                      g.const([1])], f"/model/rope/Unsqueeze_{n}") for n, t in (("cos", cos_t), ("sin", sin_t)))

    embed = g.add(bank.plain(initializer_name("embed.weight"), bank.weights["embed.weight"]))  # (vocab, hidden)
    x = _lookup(g, embed, INPUT_IDS, spec.vocab_size, "/model/embed_tokens", shape.lookup)  # (1, S, hidden)
    if spec.embed_scale is not None:
        x = g.one("Mul", [x, g.const(spec.embed_scale, np.float32)], "/model/embed_tokens/Mul")

    for i in range(spec.num_layers):
        p, w = f"/model/layers.{i}", f"layers.{i}."
        h = _norm(g, spec, w + "input_norm", x, p + "/input_layernorm")
        a = _attention(g, spec, i, h, bias, rope, shape, bits)
        if spec.sandwich_norm:
            a = _norm(g, spec, w + "post_attn_norm", a, p + "/post_attention_layernorm")
        x = g.one("Add", [x, a], p + "/attn_residual/Add")
        h = _norm(g, spec, w + "ffn_norm", x, p + "/pre_feedforward_layernorm")
        m = _mlp(g, spec, i, h, bits)
        if spec.sandwich_norm:
            m = _norm(g, spec, w + "post_ffn_norm", m, p + "/post_feedforward_layernorm")
        x = g.one("Add", [x, m], p + "/mlp_residual/Add")

    # The last position only: left padding puts the last real token there.  # (1, 1, hidden)
    last = g.one("Slice", [x, g.const([S - 1]), g.const([S]), g.const([1])], "/lm_head/Slice")
    h = _norm(g, spec, "final_norm", last, "/model/norm")
    head = bank.weights["embed.weight"] if spec.tie_word_embeddings else bank.weights["lm_head.weight"]
    tensors, quantized = bank.linear(initializer_name("lm_head.weight"), head.T, 8 if bits else None)  # (hidden, vocab)
    g.add(tensors)
    w_head = tensors[0].name
    if quantized:
        w_head = g.one("DequantizeLinear", [tensors[0].name, tensors[1].name], "/lm_head/DequantizeLinear",
                       axis=0, block_size=bank.block_size)
    g.op("MatMul", [h, w_head], "/lm_head/MatMul", outputs=[LOGITS])

    graph = helper.make_graph(g.nodes, f"edge_infer_{spec.model_type}_static_{S}", inputs, outputs,
                              initializer=list(g.inits.values()))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edge-infer")
    model.ir_version = 10
    return model


def _lookup(g: _Graph, table: str, idx: str, rows: int, name: str, how: str) -> str:
    """Rows of `table` (rows, width) at `idx` (1, S): (1, S, width)."""
    if how == "gather":
        return g.one("Gather", [table, idx], name + "/Gather", axis=0)
    hit = g.one("Equal", [g.one("Unsqueeze", [idx, g.const([-1])], name + "/Unsqueeze"), g.const(np.arange(rows))],
                name + "/Equal")  # (1, S, rows)
    return g.one("MatMul", [g.one("Cast", [hit], name + "/Cast", to=TensorProto.FLOAT), table], name + "/MatMul")


def _norm(g: _Graph, spec: DecoderSpec, key: str, x: str, name: str) -> str:
    gamma = g.add(g.bank.plain(f"model.{key}.weight", g.bank.weights[key + ".weight"]))
    if spec.norm != "rms":
        beta = g.add(g.bank.plain(f"model.{key}.bias", g.bank.weights[key + ".bias"]))
        return g.one("LayerNormalization", [x, gamma, beta], name + "/LayerNorm", axis=-1, epsilon=spec.norm_eps)
    return _rms(g, x, gamma, spec.norm_eps, name)


RMS_PRESCALE = 256.0  # x / 256 before squaring: fp16 (QNN's HTP) overflows x * x past |x| = 255


def _rms(g: _Graph, x: str, gamma: str, eps: float, name: str) -> str:
    """x / sqrt(mean(x^2) + eps) * gamma, computed as u / sqrt(mean(u^2) + eps / c^2) with u = x / c, which
    is the same value and keeps the squares in fp16 range for residual outliers in the thousands."""
    c = RMS_PRESCALE
    u = g.one("Mul", [x, g.const(1.0 / c, np.float32)], name + "/Mul_prescale")
    square = g.one("Mul", [u, u], name + "/Mul_square")
    mean = g.one("ReduceMean", [square, g.const([-1])], name + "/ReduceMean", keepdims=1)
    root = g.one("Sqrt", [g.one("Add", [mean, g.const(eps / c ** 2, np.float32)], name + "/Add_eps")], name + "/Sqrt")
    y = g.one("Mul", [u, g.one("Reciprocal", [root], name + "/Reciprocal")], name + "/Mul_norm")
    return g.one("Mul", [y, gamma], name + "/Mul_gamma")


def _heads(g: _Graph, x: str, n: int, S: int, hd: int, name: str) -> str:
    """(1, S, n * head_dim) -> (1, n, S, head_dim)."""
    x4 = g.one("Reshape", [x, g.const([1, S, n, hd])], name + "/Reshape")
    return g.one("Transpose", [x4], name + "/Transpose", perm=[0, 2, 1, 3])


def _rotate(g: _Graph, x: str, rope: tuple[str, str], name: str) -> str:
    """x * cos + rotate_half(x) * sin over (1, n, S, head_dim)."""
    x1, x2 = g.op("Split", [x], name + "/Split", n_out=2, axis=-1, num_outputs=2)
    half = g.one("Concat", [g.one("Neg", [x2], name + "/Neg"), x1], name + "/Concat", axis=-1)
    return g.one("Add", [g.one("Mul", [x, rope[0]], name + "/Mul_cos"),
                         g.one("Mul", [half, rope[1]], name + "/Mul_sin")], name + "/Add")


def _attention(g: _Graph, spec: DecoderSpec, i: int, h: str, bias: str, rope, shape: StaticShape,
               bits: int | None) -> str:
    p, w = f"/model/layers.{i}/attn", f"layers.{i}."
    S, kv, hd, heads = shape.sequence_length, spec.num_kv_heads, spec.head_dim, spec.num_heads
    group = heads // kv
    qkv = g.linear(w + "qkv", h, p + "/qkv_proj", spec.qkv_bias, bits)  # (1, S, qkv_size)
    q, k, v = g.op("Split", [qkv, g.const([heads * hd, kv * hd, kv * hd])], p + "/qkv_split", n_out=3, axis=-1)
    q, k, v = (_heads(g, q, heads, S, hd, p + "/q"), _heads(g, k, kv, S, hd, p + "/k"),
               _heads(g, v, kv, S, hd, p + "/v"))  # (1, n, S, head_dim)
    if spec.qk_norm:
        q = _rms(g, q, g.add(g.bank.plain(f"model.{w}q_norm.weight", g.bank.weights[w + "q_norm.weight"])),
                 spec.norm_eps, p + "/q_norm")
        k = _rms(g, k, g.add(g.bank.plain(f"model.{w}k_norm.weight", g.bank.weights[w + "k_norm.weight"])),
                 spec.norm_eps, p + "/k_norm")
    q = _rotate(g, q, rope, p + "/q_rotary")
    k = g.one("Identity", [_rotate(g, k, rope, p + "/k_rotary")], p + "/present_key",
              outputs=[present(i, "key")])  # (1, kv_heads, S, head_dim)
    v = g.one("Identity", [v], p + "/present_value", outputs=[present(i, "value")])

    # The query heads of one kv head stacked along the sequence axis: (1, kv_heads, group * S, head_dim).
    qg = g.one("Reshape", [q, g.const([1, kv, group * S, hd])], p + "/q_group/Reshape")
    scale = float(spec.attn_scale if spec.attn_scale is not None else hd ** -0.5)
    qg = g.one("Mul", [qg, g.const(scale, np.float32)], p + "/q_scale/Mul")
    past_k, past_v = past_pair(i)
    s_past = g.one("MatMul", [qg, g.one("Transpose", [past_k], p + "/past_k/Transpose", perm=[0, 1, 3, 2])],
                   p + "/scores_past/MatMul")  # (1, kv_heads, group * S, P)
    s_new = g.one("MatMul", [qg, g.one("Transpose", [k], p + "/new_k/Transpose", perm=[0, 1, 3, 2])],
                  p + "/scores_new/MatMul")  # (1, kv_heads, group * S, S)
    scores = g.one("Add", [g.one("Concat", [s_past, s_new], p + "/scores/Concat", axis=-1), bias], p + "/scores/Add")
    probs = g.one("Softmax", [scores], p + "/Softmax", axis=-1)  # (1, kv_heads, group * S, P + S)
    p_past, p_new = g.op("Split", [probs, g.const([shape.max_length, S])], p + "/probs_split", n_out=2, axis=-1)
    out = g.one("Add", [g.one("MatMul", [p_past, past_v], p + "/out_past/MatMul"),
                        g.one("MatMul", [p_new, v], p + "/out_new/MatMul")], p + "/out/Add")  # (1, kv, gS, hd)
    out = g.one("Reshape", [out, g.const([1, heads, S, hd])], p + "/out/Reshape")
    out = g.one("Transpose", [out], p + "/out/Transpose", perm=[0, 2, 1, 3])  # (1, S, heads, head_dim)
    out = g.one("Reshape", [out, g.const([1, S, heads * hd])], p + "/out/Reshape_1")
    return g.linear(w + "o", out, p + "/o_proj", spec.o_bias, bits)


def _mlp(g: _Graph, spec: DecoderSpec, i: int, h: str, bits: int | None) -> str:
    p, w = f"/model/layers.{i}/mlp", f"layers.{i}."
    if spec.mlp == "gated":
        gu = g.linear(w + "gate_up", h, p + "/gate_up_proj", False, bits)  # (1, S, 2 * intermediate)
        gate, up = g.op("Split", [gu], p + "/gate_up_split", n_out=2, axis=-1, num_outputs=2)
        y = g.one("Mul", [_act(g, spec, gate, p + "/act"), up], p + "/gate_mul")
    else:
        y = _act(g, spec, g.linear(w + "up", h, p + "/up_proj", spec.mlp_bias, bits), p + "/act")
    return g.linear(w + "down", y, p + "/down_proj", spec.mlp_bias, bits)


def _act(g: _Graph, spec: DecoderSpec, x: str, name: str) -> str:
    if spec.activation == "silu":
        return g.one("Mul", [x, g.one("Sigmoid", [x], name + "/Sigmoid")], name + "/Mul")
    return g.one("Gelu", [x], name + "/Gelu", approximate="tanh" if spec.activation == "gelu_tanh" else "none")
