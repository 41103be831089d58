"""Build an ONNX decoder graph straight from canonical weights, with onnxruntime's fused ops.

One graph serves prefill and decode:
    input_ids       (batch, sequence_length)            int64
    attention_mask  (batch, total_sequence_length)      int64, right-padded, 1 = real token
    position_ids    (batch, sequence_length)            int64, learned positions only
    past_key_values.{i}.key / .value  (batch, kv_heads, past_sequence_length, head_dim)
    logits_to_keep  (1,)  int64: how many of the last positions get logits (1 to decode)
    query_seqlens   (batch,)  int64: how many of each row's sequence_length new tokens are real; the
                    rest are right padding, neither attended to nor written to the cache (rows with
                    different numbers of new tokens in one pass: batched speculative verification)
  ->
    logits          (batch, logits_to_keep, vocab)      float32
    present.{i}.key / .value  (batch, kv_heads, present_sequence_length, head_dim)

Attention is `com.microsoft.GroupQueryAttention` with rotary inside. When the
runtime binds one buffer of max_length as both past and present, the op writes
the new keys in place (no copy per step). Linear layers are plain MatMuls over
(in, out) initializers named like `/model/layers.0/attn/qkv_proj/MatMul`, which
`quantize.rewrite` turns into MatMulNBits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_infer.export.rope import cos_sin_cache
from edge_infer.export.spec import DecoderSpec
from edge_infer.quantize.external import DataFile
from edge_infer.contract.io_names import (ATTENTION_MASK, INPUT_IDS, KV_KINDS, LAST_HIDDEN_STATE, LOGITS, LOGITS_TO_KEEP,
                                            PAD_ATTENTION, POSITION_IDS, QUERY_SEQLENS, past, past_pair, present, present_pair)

OPSET = 21
MS = "com.microsoft"


@dataclass(frozen=True)
class GraphIO:
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


class _Builder:
    """Collects nodes and initializers; names every node as a path."""

    def __init__(self, dtype: npt.DTypeLike, store: DataFile | None = None):
        self.dtype = np.dtype(dtype)
        self.onnx_dtype = helper.np_dtype_to_tensor_dtype(self.dtype)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._consts: dict[tuple, str] = {}
        self.store = store

    def _emit(self, name: str, a: np.ndarray) -> None:
        """One initializer: into the store's data file right away (the graph keeps its offset), or inline."""
        if self.store is not None and not isinstance(a, np.ndarray):  # a weight not read yet (checkpoint.Deferred)
            self.inits.append(self.store.defer(name, a))
            return
        a = a if a.flags.c_contiguous else np.ascontiguousarray(a)  # (ascontiguousarray makes scalars 1-D)
        self.inits.append(self.store.add(name, a) if self.store is not None else numpy_helper.from_array(a, name))

    def weight(self, name: str, array: np.ndarray, keep_dtype: bool = False) -> str:
        self._emit(name, array if keep_dtype else array.astype(self.dtype, copy=False))
        return name

    def const(self, value, dtype=np.int64) -> str:
        a = np.asarray(value, dtype=dtype)
        key = (a.dtype.str, a.shape, a.tobytes())
        if key not in self._consts:
            name = f"const.{len(self._consts)}"
            self._emit(name, a)
            self._consts[key] = name
        return self._consts[key]

    def op(self, op_type: str, inputs: list[str], name: str, n_out: int = 1,
           domain: str = "", outputs: list[str] | None = None, **attrs) -> list[str]:
        outs = outputs or [f"{name}/output_{k}" for k in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain, **attrs))
        return outs

    def one(self, op_type: str, inputs: list[str], name: str, **kw) -> str:
        return self.op(op_type, inputs, name, **kw)[0]


def build_decoder(spec: DecoderSpec, weights: Mapping[str, np.ndarray], max_length: int,
                  dtype: str = "fp32", store: DataFile | None = None,
                  head: str = "lm_head") -> tuple[onnx.ModelProto, GraphIO]:
    """The decoder graph for `spec` with `weights` (canonical names, float32 arrays).

    `head` "hidden" (export --task embed) ends at the final norm: the output is
    `last_hidden_state` (batch, sequence_length, hidden) for every position, no logits_to_keep input.

    With a `store`, each initializer goes to its external-data file as soon as it is built and
    `weights` may be a lazy mapping: the graph then never holds more than one weight's array.
    """
    b = _Builder(np.float16 if dtype == "fp16" else np.float32, store)
    inputs, outputs = _graph_io(spec, head, b.onnx_dtype)
    lengths = _attention_lengths(b, switchable=head == "lm_head")

    rope_caches = {}
    if spec.rope is not None:
        _check_rotary_dim(spec)
        cos, sin = cos_sin_cache(spec.rope, max_length)
        rope_caches["full"] = (b.weight("cos_cache", cos), b.weight("sin_cache", sin))
        if spec.local_rope is not None:
            cos, sin = cos_sin_cache(spec.local_rope, max_length)
            rope_caches["sliding"] = (b.weight("cos_cache_local", cos), b.weight("sin_cache_local", sin))

    embed, x = _embeddings(b, spec, weights)  # (batch, sequence_length, hidden)

    residual = x
    h = _norm(b, spec, weights, "layers.0.input_norm", x, "/model/layers.0/input_layernorm")
    for i in range(spec.num_layers):
        p, w = f"/model/layers.{i}", f"layers.{i}."
        attn = _attention(b, spec, weights, i, h, lengths, rope_caches)
        if spec.sandwich_norm:
            attn = _norm(b, spec, weights, w + "post_attn_norm", attn, p + "/post_attention_layernorm")
        h, residual = _skip_norm(b, spec, weights, w + "ffn_norm", attn, residual, p + "/pre_feedforward_layernorm")
        mlp = _mlp(b, spec, weights, i, h)
        if spec.sandwich_norm:
            mlp = _norm(b, spec, weights, w + "post_ffn_norm", mlp, p + "/post_feedforward_layernorm")
        nxt = f"layers.{i + 1}.input_norm" if i + 1 < spec.num_layers else "final_norm"
        name = f"/model/layers.{i + 1}/input_layernorm" if i + 1 < spec.num_layers else "/model/norm"
        h, residual = _skip_norm(b, spec, weights, nxt, mlp, residual, name)

    if head == "hidden":  # (batch, sequence_length, hidden): pooled by runtime/embed.py
        b.op("Cast", [h], "/model/hidden/Cast", outputs=[LAST_HIDDEN_STATE], to=TensorProto.FLOAT)
    else:
        _lm_head(b, spec, weights, h, embed)
    graph = helper.make_graph(b.nodes, f"edge_infer_{spec.model_type}", inputs, outputs, initializer=b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                              producer_name="edge-infer")
    model.ir_version = 10
    io = GraphIO(tuple(i.name for i in inputs), tuple(o.name for o in outputs))
    return model, io


def _graph_io(spec: DecoderSpec, head: str, kv_type: int) -> tuple[list, list]:
    """The graph's inputs and outputs (contract/io_names.py), the KV cache's in `kv_type`."""
    kv_shape: list[str | int] = ["batch", spec.num_kv_heads, "past_sequence_length", spec.head_dim]
    present_shape: list[str | int] = ["batch", spec.num_kv_heads, "present_sequence_length", spec.head_dim]
    inputs = [helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, ["batch", "sequence_length"]),
              helper.make_tensor_value_info(ATTENTION_MASK, TensorProto.INT64, ["batch", "total_sequence_length"])]
    if spec.position == "learned":
        inputs.append(helper.make_tensor_value_info(POSITION_IDS, TensorProto.INT64, ["batch", "sequence_length"]))
    if head == "lm_head":
        inputs.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, [1]))
    inputs.append(helper.make_tensor_value_info(QUERY_SEQLENS, TensorProto.INT64, ["batch"]))
    if head == "lm_head":
        inputs.append(helper.make_tensor_value_info(PAD_ATTENTION, TensorProto.INT64, [1]))
    outputs = [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["batch", LOGITS_TO_KEEP, spec.vocab_size])
               if head == "lm_head" else
               helper.make_tensor_value_info(LAST_HIDDEN_STATE, TensorProto.FLOAT,
                                             ["batch", "sequence_length", spec.hidden_size])]
    for i in range(spec.num_layers):
        for kind in KV_KINDS:
            inputs.append(helper.make_tensor_value_info(past(i, kind), kv_type, kv_shape))
            outputs.append(helper.make_tensor_value_info(present(i, kind), kv_type, present_shape))
    return inputs, outputs


def _attention_lengths(b: _Builder, switchable: bool) -> _Lengths:
    """Lengths for GroupQueryAttention, from the right-padded mask."""
    mask_sum = b.one("ReduceSum", [ATTENTION_MASK, b.const([1])], "/model/attn_mask/ReduceSum", keepdims=0)
    seqlens = b.one("Sub", [mask_sum, b.const(1)], "/model/attn_mask/Sub")
    seqlens_k = b.one("Cast", [seqlens], "/model/attn_mask/seqlens_k", to=TensorProto.INT32)  # (batch,)
    mask_shape = b.one("Shape", [ATTENTION_MASK], "/model/attn_mask/Shape")
    total = b.one("Gather", [mask_shape, b.const(1)], "/model/attn_mask/Gather", axis=0)
    total_len = b.one("Cast", [total], "/model/attn_mask/total_len", to=TensorProto.INT32)  # ()
    # With query_seqlens, GroupQueryAttention takes each row's past length from seqlens_k + 1 - query_seqlens
    # and total_len only as an upper bound, so rows may add different numbers of tokens in one pass.
    query_lens = b.one("Cast", [QUERY_SEQLENS], "/model/attn_mask/query_seqlens", to=TensorProto.INT32)  # (batch,)
    return _one_token_padding(b, seqlens, seqlens_k, total_len, query_lens, switchable)


def _embeddings(b: _Builder, spec: DecoderSpec, weights) -> tuple[str, str]:
    """(the embedding table, the embedded ids (batch, sequence_length, hidden))."""
    embed = b.weight(initializer_name("embed.weight"), weights["embed.weight"])
    x = b.one("Gather", [embed, INPUT_IDS], "/model/embed_tokens/Gather", axis=0)
    if spec.embed_scale is not None:
        scale = np.asarray(spec.embed_scale, dtype=b.dtype)
        x = b.one("Mul", [x, b.const(scale, b.dtype)], "/model/embed_tokens/Mul")
    if spec.position == "learned":
        wpe = b.weight(initializer_name("embed_positions.weight"), weights["embed_positions.weight"])
        pos = b.one("Gather", [wpe, POSITION_IDS], "/model/embed_positions/Gather", axis=0)
        x = b.one("Add", [x, pos], "/model/embed_positions/Add")
    return embed, x


def _lm_head(b: _Builder, spec: DecoderSpec, weights, h: str, embed: str) -> None:
    # Logits for the last `logits_to_keep` positions only.  # (batch, logits_to_keep, hidden)
    start = b.one("Neg", [LOGITS_TO_KEEP], "/lm_head/keep/Neg")
    h = b.one("Slice", [h, start, b.const([np.iinfo(np.int64).max]), b.const([1])], "/lm_head/Slice")
    if spec.tie_word_embeddings:
        head_w = b.one("Transpose", [embed], "/lm_head/Transpose", perm=[1, 0])
    else:
        head_w = b.weight(initializer_name("lm_head.weight"), weights["lm_head.weight"].T)
    logits = b.one("MatMul", [h, head_w], "/lm_head/MatMul")
    if spec.final_softcap is not None:
        cap = b.const(np.asarray(spec.final_softcap, dtype=b.dtype), b.dtype)
        logits = b.one("Mul", [b.one("Tanh", [b.one("Div", [logits, cap], "/lm_head/softcap/Div")],
                                     "/lm_head/softcap/Tanh"), cap], "/lm_head/softcap/Mul")
    b.op("Cast", [logits], "/lm_head/Cast", outputs=[LOGITS], to=TensorProto.FLOAT)


@dataclass(frozen=True)
class _Lengths:
    """GroupQueryAttention's length inputs, after one-token padding (see _one_token_padding)."""
    seqlens_k: str  # (batch,) int32
    total: str  # () int32
    query: str  # (batch,) int32
    pads: str  # (6,) int64: Pad's pads for (batch, sequence_length, width), one zero row at the end or none
    seq: str  # (1,) int64: the pass's sequence_length, where the attention output is cut back


def _one_token_padding(b: _Builder, seqlens: str, seqlens_k: str, total_len: str, query_lens: str,
                       switchable: bool) -> _Lengths:
    """Batch invariance inside the graph: attention of a one-token pass runs as a two-token one.

    GroupQueryAttention computes a one-token pass on its own decode path, which rounds differently
    from its path for two or more tokens (up to ~1e-7, which int8 activations downstream turn into
    logit differences of 0.3), while every other op here gives each row the same bits whatever the
    number of rows. So when a pass has one token per row (a decode step) and the cache has room,
    the attention alone gets a zero second row, counted in query_seqlens for the rows that have a
    token: its key lands one position past the row's length, where the next pass overwrites it,
    and its output is cut off. The matmuls keep their one-row kernels (a runtime padding id would
    double their rows: +14% per decode step), and a decode step, a verification, a prefill chunk
    and a server row give bitwise-identical logits. `switchable` (decoders with logits): the
    `pad_attention` input (1 or 0) turns it off for a pass whose logits no other grouping must match,
    plain decoding of one sequence (runtime/generate.py), where the padding row cost 5-12% of a step.
    """
    seq = b.one("Gather", [b.one("Shape", [INPUT_IDS], "/model/pad_one/Shape"), b.const([1])],
                "/model/pad_one/seq", axis=0)  # (1,)
    one = b.one("Equal", [seq, b.const([1])], "/model/pad_one/is_one")
    capacity = b.one("Gather", [b.one("Shape", [past_pair(0)[0]], "/model/pad_one/cache_shape"),
                                b.const([2])], "/model/pad_one/capacity", axis=0)  # (1,) the shared buffer's length
    need = b.one("Add", [b.one("ReduceMax", [seqlens], "/model/pad_one/last", keepdims=1), b.const([2])],
                 "/model/pad_one/need")  # (1,) the padding row's position + 1
    room = b.one("LessOrEqual", [need, capacity], "/model/pad_one/room")
    both = b.one("And", [one, room], "/model/pad_one/And")
    if switchable:
        wanted = b.one("Cast", [PAD_ATTENTION], "/model/pad_one/wanted", to=TensorProto.BOOL)
        both = b.one("And", [both, wanted], "/model/pad_one/AndWanted")
    pad = b.one("Cast", [both], "/model/pad_one/pad", to=TensorProto.INT64)  # (1,) 1 or 0
    pads = b.one("Concat", [b.const([0, 0, 0, 0]), pad, b.const([0])], "/model/pad_one/pads", axis=0)
    pad32 = b.one("Cast", [pad], "/model/pad_one/pad32", to=TensorProto.INT32)
    extra = b.one("Mul", [query_lens, pad32], "/model/pad_one/extra")  # (batch,) 1 for a row with its token
    return _Lengths(seqlens_k=b.one("Add", [seqlens_k, extra], "/model/pad_one/seqlens_k"),
                    total=b.one("Add", [total_len, b.one("Squeeze", [pad32], "/model/pad_one/pad_scalar")],
                                "/model/pad_one/total"),
                    query=b.one("Add", [query_lens, extra], "/model/pad_one/query_seqlens"),
                    pads=pads, seq=seq)


def _check_rotary_dim(spec: DecoderSpec) -> None:
    """GroupQueryAttention rotates the first rotary_dim values of each head (partial rotary
    when rotary_dim < head_dim), and its kernels need rotary_dim / 2 to be a multiple of 8."""
    assert spec.rope is not None, "only rotary models are checked"
    dim = spec.rope.rotary_dim
    if dim > spec.head_dim or dim % 16:
        from edge_infer.contract.errors import ModelFileError

        raise ModelFileError(f"rotary dimension {dim} (head dim {spec.head_dim}) is not supported: onnxruntime's "
                             "GroupQueryAttention needs a multiple of 16 no larger than the head dim")


def _norm(b: _Builder, spec: DecoderSpec, weights, key: str, x: str, name: str) -> str:
    gamma = b.weight(_param(key), weights[key + ".weight"])
    if spec.norm == "rms":
        return b.one("SimplifiedLayerNormalization", [x, gamma], name + "/SimplifiedLayerNorm",
                     axis=-1, epsilon=spec.norm_eps, stash_type=1)
    beta = b.weight(_param(key, "bias"), weights[key + ".bias"])
    return b.one("LayerNormalization", [x, gamma, beta], name + "/LayerNorm", axis=-1, epsilon=spec.norm_eps)


def _skip_norm(b: _Builder, spec: DecoderSpec, weights, key: str, x: str, skip: str,
               name: str) -> tuple[str, str]:
    """norm(x + skip) and x + skip, in one fused node."""
    gamma = b.weight(_param(key), weights[key + ".weight"])
    if spec.norm == "rms":
        out, _, _, total = b.op("SkipSimplifiedLayerNormalization", [x, skip, gamma],
                                name + "/SkipLayerNorm", n_out=4, domain=MS, epsilon=spec.norm_eps)
    else:
        beta = b.weight(_param(key, "bias"), weights[key + ".bias"])
        out, _, _, total = b.op("SkipLayerNormalization", [x, skip, gamma, beta],
                                name + "/SkipLayerNorm", n_out=4, domain=MS, epsilon=spec.norm_eps)
    return out, total


def _linear(b: _Builder, weights, key: str, x: str, name: str, bias: bool) -> str:
    w = b.weight(_param(key), weights[key + ".weight"].T)  # (in, out)
    y = b.one("MatMul", [x, w], name + "/MatMul")
    if bias:
        y = b.one("Add", [y, b.weight(_param(key, "bias"), weights[key + ".bias"])], name + "/Add")
    return y


def _attention(b: _Builder, spec: DecoderSpec, weights, i: int, h: str, lengths: _Lengths,
               rope_caches: dict) -> str:
    p, w = f"/model/layers.{i}/attn", f"layers.{i}."
    qkv = _linear(b, weights, w + "qkv", h, p + "/qkv_proj", spec.qkv_bias)  # (batch, seq, qkv_size)
    q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    if spec.qk_norm:
        q, k, v = b.op("Split", [qkv, b.const([q_size, kv_size, kv_size])], p + "/qkv_split", n_out=3, axis=-1)
        q = _head_norm(b, spec, weights, w + "q_norm", q, spec.num_heads, p + "/q_norm")
        k = _head_norm(b, spec, weights, w + "k_norm", k, spec.num_kv_heads, p + "/k_norm")
        qkv_inputs = [q, k, v]
    else:
        qkv_inputs = [qkv, "", ""]  # packed: (batch, seq, (heads + 2 * kv_heads) * head_dim)
    qkv_inputs = [b.one("Pad", [t, lengths.pads], f"{p}/pad_one/{n}") if t else t
                  for n, t in zip(("q", "k", "v"), qkv_inputs)]
    sliding = spec.layer_type(i) == "sliding"
    attrs: dict[str, Any] = dict(num_heads=spec.num_heads, kv_num_heads=spec.num_kv_heads,
                 scale=float(spec.attn_scale if spec.attn_scale is not None else spec.head_dim ** -0.5))
    rope_in = ["", ""]
    if spec.rope is not None:
        attrs.update(do_rotary=1, rotary_interleaved=0)
        rope_in = list(rope_caches["sliding" if sliding and "sliding" in rope_caches else "full"])
    if spec.attn_softcap is not None:
        attrs["softcap"] = float(spec.attn_softcap)
    if sliding and spec.sliding_window:
        attrs["local_window_size"] = int(spec.sliding_window)
    out = b.op("GroupQueryAttention",
               qkv_inputs + [*past_pair(i), lengths.seqlens_k, lengths.total]
               + rope_in + [""] * 7 + [lengths.query],  # inputs 9-15 (position_ids .. k_norm_weight) unused
               p + "/GroupQueryAttention", domain=MS,
               outputs=[f"{p}/GroupQueryAttention/output_0", *present_pair(i)], **attrs)[0]
    out = b.one("Slice", [out, b.const([0]), lengths.seq, b.const([1])], p + "/pad_one/cut")  # padding row off
    return _linear(b, weights, w + "o", out, p + "/o_proj", spec.o_bias)


def _head_norm(b: _Builder, spec: DecoderSpec, weights, key: str, x: str, heads: int, name: str) -> str:
    """RMSNorm over each head's head_dim values (qwen3, gemma3)."""
    x4 = b.one("Reshape", [x, b.const([0, 0, heads, spec.head_dim])], name + "/Reshape")
    gamma = b.weight(_param(key), weights[key + ".weight"])
    y = b.one("SimplifiedLayerNormalization", [x4, gamma], name + "/SimplifiedLayerNorm",
              axis=-1, epsilon=spec.norm_eps, stash_type=1)
    return b.one("Reshape", [y, b.const([0, 0, heads * spec.head_dim])], name + "/Reshape_1")


def _act(b: _Builder, spec: DecoderSpec, x: str, name: str) -> str:
    if spec.activation == "silu":
        return b.one("Mul", [x, b.one("Sigmoid", [x], name + "/Sigmoid")], name + "/Mul")
    approx = "tanh" if spec.activation == "gelu_tanh" else "none"
    return b.one("Gelu", [x], name + "/Gelu", approximate=approx)


def _mlp(b: _Builder, spec: DecoderSpec, weights, i: int, h: str) -> str:
    p, w = f"/model/layers.{i}/mlp", f"layers.{i}."
    if spec.mlp == "gated":
        gu = _linear(b, weights, w + "gate_up", h, p + "/gate_up_proj", False)  # (batch, seq, 2 * inter)
        size = spec.intermediate_size
        gate, up = b.op("Split", [gu, b.const([size, size])], p + "/gate_up_split", n_out=2, axis=-1)
        y = b.one("Mul", [_act(b, spec, gate, p + "/act"), up], p + "/gate_mul")
    else:
        y = _act(b, spec, _linear(b, weights, w + "up", h, p + "/up_proj", spec.mlp_bias), p + "/act")
    return _linear(b, weights, w + "down", y, p + "/down_proj", spec.mlp_bias)


# The vocabulary-sized weights, whose initializer names are not `model.` + the canonical name.
VOCAB_WEIGHTS = {"embed.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight"}


def initializer_name(canonical: str) -> str:
    """The graph initializer of a canonical weight ("layers.0.attn.qkv.weight" -> "model.layers.0.attn.qkv.weight",
    "embed.weight" -> "model.embed_tokens.weight"): the one mapping the builders, the quantization step and
    the GGUF import report name weights by."""
    return VOCAB_WEIGHTS.get(canonical, f"model.{canonical}")


def _param(key: str, kind: str = "weight") -> str:
    return initializer_name(f"{key}.{kind}")
