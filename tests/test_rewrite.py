"""quantize_graph on tiny graphs that follow the exporter's conventions, checked in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_infer.quantize.nbits import QuantizedLinear, dequantize, packed_b, quantize_rtn, unpack_bits
from edge_infer.quantize.config import QuantConfig
from edge_infer.quantize.rewrite import quantize_graph, quantize_summary
from edge_infer.contract.errors import UserError

V, D, F = 51, 80, 96  # vocab (odd), hidden (not a multiple of 32), mlp width
EMBED = "model.embed_tokens.weight"
UP = "model.layers.0.mlp.up_proj.weight"
DOWN = "model.layers.0.mlp.down_proj.weight"
LM = "lm_head.weight"


def weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        EMBED: rng.standard_normal((V, D)).astype(np.float32),  # (V, D)
        UP: (rng.standard_normal((D, F)) / np.sqrt(D)).astype(np.float32),  # (K, N)
        "up_bias": rng.standard_normal(F).astype(np.float32) * 0.1,
        DOWN: (rng.standard_normal((F, D)) / np.sqrt(F)).astype(np.float32),
        LM: (rng.standard_normal((D, V)) / np.sqrt(D)).astype(np.float32),
    }


def build(tied: bool, dtype=np.float32, opset: int = 17) -> onnx.ModelProto:
    """input_ids -> embed Gather -> up MatMul + Add -> down MatMul -> + residual -> lm_head MatMul."""
    w = weights()
    if tied:
        del w[LM]
    t = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [
        helper.make_node("Gather", [EMBED, "input_ids"], ["h0"], name="/model/embed_tokens/Gather"),
        helper.make_node("MatMul", ["h0", UP], ["u"], name="/model/layers.0/mlp/up_proj/MatMul"),
        helper.make_node("Add", ["u", "up_bias"], ["h1"], name="/model/layers.0/mlp/up_proj/Add"),
        helper.make_node("MatMul", ["h1", DOWN], ["h2"], name="/model/layers.0/mlp/down_proj/MatMul"),
        helper.make_node("Add", ["h2", "h0"], ["h3"], name="/model/layers.0/residual/Add"),
    ]
    if tied:
        wt = "/lm_head/Transpose/output_0"  # (D, V)
        nodes.append(helper.make_node("Transpose", [EMBED], [wt], name="/lm_head/Transpose", perm=[1, 0]))
        nodes.append(helper.make_node("MatMul", ["h3", wt], ["logits"], name="/lm_head/MatMul"))
    else:
        nodes.append(helper.make_node("MatMul", ["h3", LM], ["logits"], name="/lm_head/MatMul"))
    graph = helper.make_graph(
        nodes,
        "toy",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence_length"])],
        [
            helper.make_tensor_value_info("logits", t, ["batch", "sequence_length", V]),
            helper.make_tensor_value_info("h0", t, ["batch", "sequence_length", D]),
        ],
        [numpy_helper.from_array(v.astype(dtype), k) for k, v in w.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def run(model: onnx.ModelProto, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    logits, h0 = sess.run(["logits", "h0"], {"input_ids": ids})
    return logits, h0


def stored(model: onnx.ModelProto, prefix: str, bits: int, block_size: int, k: int) -> QuantizedLinear:
    """Read a QuantizedLinear back from the initializers quantize_graph wrote."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    b = inits[f"{prefix}_Q{bits}"]  # (N, n_blocks, blob)
    n, nb, _ = b.shape
    q = unpack_bits(b, bits, block_size).reshape(n, nb * block_size)
    zp = inits.get(f"{prefix}_zp")
    if zp is not None and zp.dtype == np.uint8:
        zp = unpack_bits(zp, bits, nb)
    return QuantizedLinear(bits, block_size, q, inits[f"{prefix}_scales"].astype(np.float32), zp, k)


def reference(w: dict[str, np.ndarray], ids: np.ndarray, embed, up, down, lm) -> tuple[np.ndarray, np.ndarray]:
    """numpy forward pass with the given (K, N) weights and (V, D) embedding."""
    h0 = embed[ids]  # (batch, sequence_length, D)
    h3 = (h0 @ up + w["up_bias"]) @ down + h0
    return h3 @ lm, h0


IDS = np.array([[0, 5, 50, 7], [3, 3, 49, 1]], dtype=np.int64)  # (batch=2, sequence_length=4)

CASES = [
    # bits, block, symmetric, embeddings, lm_head, tied
    (4, 32, False, "int8", "int8", True),
    (4, 32, True, "int4", "int4", True),
    (4, 32, False, "int4", "int4", True),
    (4, 16, False, "int4", "int8", False),
    (8, 64, False, "int8", "int4", False),
    (4, 128, True, "int4", "fp", False),
    (8, 16, True, "fp", "int8", False),
    (4, 32, False, "fp", "fp", True),
]


@pytest.mark.parametrize("bits,block,sym,emb,lm,tied", CASES)
def test_matches_dequantized_reference(bits, block, sym, emb, lm, tied):
    model = build(tied)
    cfg = QuantConfig(bits=bits, block_size=block, symmetric=sym, accuracy_level=0, embeddings=emb, lm_head=lm)
    q = quantize_graph(model, cfg)
    onnx.checker.check_model(q)
    w = weights()
    bits_of = {"int8": 8, "int4": 4}
    embed = dequantize(stored(q, EMBED, bits_of[emb], block, D)) if emb != "fp" else w[EMBED]
    up = dequantize(stored(q, UP, bits, block, D)).T
    down = dequantize(stored(q, DOWN, bits, block, F)).T
    if tied:
        lm_w = embed.T
    else:
        lm_w = dequantize(stored(q, LM, bits_of[lm], block, D)).T if lm != "fp" else w[LM]
    ref_logits, ref_h0 = reference(w, IDS, embed, up, down, lm_w)
    logits, h0 = run(q, IDS)
    np.testing.assert_array_equal(h0, ref_h0)  # the gather reproduces dequantized rows exactly
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4 * np.abs(ref_logits).max())
    fp_logits, _ = run(model, IDS)
    err = np.abs(logits - fp_logits).max() / np.abs(fp_logits).max()
    assert err < (0.2 if 4 in (bits, bits_of.get(emb), bits_of.get(lm)) else 0.03)


def test_accuracy_level_4_close_to_fp32():
    model = build(tied=True)
    q = quantize_graph(model, QuantConfig(bits=8, accuracy_level=4))
    logits, _ = run(q, IDS)
    fp, _ = run(model, IDS)
    assert np.abs(logits - fp).max() / np.abs(fp).max() < 0.05
    assert (logits.argmax(-1) == fp.argmax(-1)).mean() > 0.8


def test_tied_embedding_stored_once():
    model = build(tied=True)
    original = model.SerializeToString()
    q = quantize_graph(model, QuantConfig(bits=4, embeddings="int4", lm_head="int4"))
    assert model.SerializeToString() == original  # the input model is left alone
    names = [t.name for t in q.graph.initializer]
    assert EMBED not in names and f"{EMBED}_Q4" in names
    assert sum(n.startswith(EMBED) for n in names) == 3  # B, scales, zero points: once
    readers = [n.name for n in q.graph.node if f"{EMBED}_Q4" in n.input]
    assert readers == ["/model/embed_tokens/GatherB", "/lm_head/MatMulNBits"]
    assert not any(n.op_type == "Transpose" for n in q.graph.node)
    sizes = {t.name: len(t.raw_data) for t in q.graph.initializer}
    n_blocks = 3  # D=80 in blocks of 32
    assert sizes[f"{EMBED}_Q4"] == V * n_blocks * 16  # (V, n_blocks, blob) uint8
    assert sizes[f"{EMBED}_scales"] == V * n_blocks * 4  # (V, n_blocks) float32
    assert sizes[f"{EMBED}_zp"] == V * 2  # (V, ceil(n_blocks / 2)) packed nibbles
    others = [size for name, size in sizes.items() if not name.startswith(("model.", "up_bias"))]
    assert max(others) <= 64  # only shape constants besides the weights


def test_tied_requires_matching_choices():
    with pytest.raises(UserError, match="lm_head"):
        quantize_graph(build(tied=True), QuantConfig(bits=4, embeddings="int8", lm_head="int4"))
    with pytest.raises(UserError, match="lm_head"):
        quantize_graph(build(tied=True), QuantConfig(bits=4, exclude=("/lm_head/",)))


def test_prequantized_used_verbatim():
    w = weights()
    pre = quantize_rtn(w[UP].T, bits=4, block_size=32, symmetric=True)
    # A distinctive import: the float zero points GGUF Q4_1 carries (zp = -min / d).
    pre = QuantizedLinear(4, 32, pre.q, pre.scales, np.full(pre.scales.shape, 7.25, np.float32), pre.k)
    embed_pre = quantize_rtn(w[EMBED], bits=8, block_size=32)
    q = quantize_graph(
        build(tied=True), QuantConfig(bits=4, accuracy_level=0), prequantized={UP: pre, EMBED: embed_pre}
    )
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    np.testing.assert_array_equal(inits[f"{UP}_Q4"], packed_b(pre))  # bit-identical B
    np.testing.assert_array_equal(inits[f"{UP}_zp"], pre.zero_points)
    np.testing.assert_array_equal(inits[f"{EMBED}_Q8"], packed_b(embed_pre))
    assert quantize_summary(q)["requantized"] == []
    _, h0 = run(q, IDS)
    np.testing.assert_array_equal(h0, dequantize(embed_pre)[IDS])


def test_embedding_with_float_zero_points():
    # GGUF Q4_1 rows: d * q + m, i.e. zero point -m / d as a float, shared by the tied lm_head.
    w = weights()
    rtn = quantize_rtn(w[EMBED], bits=4, block_size=32)
    pre = QuantizedLinear(4, 32, rtn.q, rtn.scales, rtn.zero_points.astype(np.float32) + 0.3, rtn.k)
    q = quantize_graph(build(tied=True), QuantConfig(bits=4, embeddings="int4", lm_head="int4", accuracy_level=0),
                       prequantized={EMBED: pre})  # fmt: skip
    logits, h0 = run(q, IDS)
    embed = dequantize(pre)
    np.testing.assert_array_equal(h0, embed[IDS])
    up, down = dequantize(stored(q, UP, 4, 32, D)).T, dequantize(stored(q, DOWN, 4, 32, F)).T
    ref, _ = reference(w, IDS, embed, up, down, embed.T)
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_prequantized_with_other_block_size_is_requantized():
    w = weights()
    pre = quantize_rtn(w[DOWN].T, bits=4, block_size=64)
    q = quantize_graph(build(tied=False), QuantConfig(bits=4, block_size=32), prequantized={DOWN: pre})
    assert quantize_summary(q)["requantized"] == [DOWN]
    scales = next(t for t in q.graph.initializer if t.name == f"{DOWN}_scales")
    assert tuple(scales.dims) == (D, 3)  # re-blocked at 32 over K=F=96


def test_exclude_keeps_float_and_summary():
    model = build(tied=False)
    seen = []
    q = quantize_graph(model, QuantConfig(bits=4, exclude=("down_proj",)), progress=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)]  # embedding, up_proj, lm_head
    names = {t.name for t in q.graph.initializer}
    assert DOWN in names and UP not in names and LM not in names
    s = quantize_summary(q)
    assert s["quantized_nodes"] == 2 and s["quantized_by_bits"] == {"4": 1, "8": 1}
    assert s["kept_float_names"] == ["/model/layers.0/mlp/down_proj/MatMul"]
    assert s["embeddings"] == "int8" and s["tied_embeddings"] is False
    floats = 4 * (V * D + D * F + F + F * D + D * V)
    assert s["bytes_before"] == floats
    assert s["bytes_after"] < floats * 0.6
    assert any(op.domain == "com.microsoft" for op in q.opset_import)


def test_fp_everything_leaves_embedding_and_lm_head():
    q = quantize_graph(build(tied=True), QuantConfig(bits=8, embeddings="fp", lm_head="fp"))
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("MatMulNBits") == 2 and "Transpose" in ops and ops[0] == "Gather"
    assert EMBED in {t.name for t in q.graph.initializer}


def test_fp16_graph():
    model = build(tied=True, dtype=np.float16)
    q = quantize_graph(model, QuantConfig(bits=4, accuracy_level=0))
    logits, h0 = run(q, IDS)
    assert logits.dtype == np.float16 and h0.dtype == np.float16
    fp, fp_h0 = run(build(tied=True), IDS)
    assert np.abs(logits.astype(np.float32) - fp).max() / np.abs(fp).max() < 0.2
    assert np.abs(h0.astype(np.float32) - fp_h0).max() < 0.02 * np.abs(fp_h0).max()


def test_old_opset_refused_for_embeddings():
    with pytest.raises(UserError, match="opset 13"):
        quantize_graph(build(tied=False, opset=12), QuantConfig(bits=4))


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"bits": 3}, "bits"),
        ({"bits": 4, "block_size": 48}, "block_size"),
        ({"bits": 4, "block_size": 512}, "block_size"),
        ({"bits": 4, "accuracy_level": 7}, "accuracy_level"),
        ({"bits": 4, "embeddings": "int2"}, "embeddings"),
        ({"bits": 4, "lm_head": "fp32"}, "lm_head"),
        ({"bits": 4, "exclude": "lm_head"}, "exclude"),
    ],
)
def test_config_validate(kwargs, field):
    with pytest.raises(UserError, match=field):
        QuantConfig(**kwargs).validate()
