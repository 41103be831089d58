"""Vocabulary-sized weights walked in row slices (issue 19, export memory): each slice-wise path
gives what the whole-tensor path gives, bit for bit where the values are copies or rounding.

- GGUF tensors dequantized a range of rows at a time (GGUFTensor.dequantize_rows);
- external data and deferred weights read a range of rows (quantize.external.read_rows);
- the quantizer rounding an embedding-shaped weight in slices (quantize.rewrite._round_in_slices);
- the segmented fp32 reference running a big Gather and a tied lm_head a slice at a time.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as QT
from onnx import TensorProto, helper, numpy_helper

from edge_infer.export import segments
from edge_infer.export.checkpoint import Deferred
from edge_infer.export.gguf_file import GGUFTensor
from edge_infer.export.segments import StoredGraph, run_segmented
from edge_infer.quantize import rewrite
from edge_infer.quantize.config import QuantConfig
from edge_infer.quantize.external import DataFile, read_rows, read_tensor

RNG = np.random.default_rng(19)
F16_FIELDS = {QT.Q4_K: [0, 2], QT.Q6_K: [208]}


def _raw(qtype: QT, n: int, k: int) -> np.ndarray:
    if qtype == QT.F32:
        return RNG.standard_normal((n, k)).astype(np.float32).view(np.uint8).reshape(-1)
    if qtype == QT.F16:
        return RNG.standard_normal((n, k)).astype(np.float16).view(np.uint8).reshape(-1)
    if qtype == QT.Q8_0:
        import gguf

        return gguf.quants.quantize(RNG.standard_normal((n, k)).astype(np.float32), qtype).reshape(-1)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = RNG.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    for pos in F16_FIELDS[qtype]:
        raw[..., pos:pos + 2] = RNG.uniform(1e-4, 1e-3, (n, k // block)).astype(np.float16).view(
            np.uint8).reshape(n, k // block, 2)
    return raw.reshape(-1)


@pytest.mark.parametrize("qtype", [QT.Q6_K, QT.Q4_K, QT.Q8_0, QT.F16, QT.F32])
@pytest.mark.parametrize("ordered", [False, True])
def test_gguf_rows_equal_the_whole_tensor(qtype, ordered):
    n, k = 37, 512
    t = GGUFTensor("token_embd.weight", (n, k), qtype.name, _raw(qtype, n, k))
    if ordered:
        t = t.with_row_order(RNG.permutation(n))
    whole = t.dequantize()
    parts = [t.dequantize_rows(a, min(n, a + 10)) for a in range(0, n, 10)]
    assert np.array_equal(np.concatenate(parts), whole)
    assert t.dequantize_rows(30, 99).shape == (7, k)


def test_external_and_deferred_rows_equal_the_whole_tensor(tmp_path):
    w = RNG.standard_normal((300, 64)).astype(np.float32)
    with DataFile(tmp_path / "d.data") as f:
        ext = f.add("w", w)
        calls = []
        deferred = f.defer("lazy", Deferred(lambda: w, w.shape, rows=lambda a, b: calls.append((a, b)) or w[a:b]))
        plain = f.defer("plain", Deferred(lambda: w, w.shape))
    for t in (ext, deferred, plain):
        whole = read_tensor(t, tmp_path, f.deferred)
        assert np.array_equal(whole, w)
        assert np.array_equal(read_rows(t, tmp_path, f.deferred, 100, 220), w[100:220])
        assert np.array_equal(read_rows(t, tmp_path, f.deferred, 290, 400), w[290:])
    assert calls == [(100, 220), (290, 400)]  # the deferred weight read only the rows asked for


@pytest.mark.parametrize("bits,rounding", [(8, "search"), (4, "rtn"), (4, "search")])
def test_rounding_in_row_slices_equals_the_whole_weight(monkeypatch, bits, rounding):
    w = (RNG.standard_normal((1000, 96)) * 0.05).astype(np.float32)
    config = QuantConfig.from_options("int4", 32, False, 4, "int8", "int8", rounding)
    whole = rewrite._round(w, bits, config)
    monkeypatch.setattr(rewrite, "ROUND_SLICE_ROWS", 96)
    read = []
    sliced = rewrite._round_in_slices(lambda a, b: read.append(b - a) or w[a:b], 1000, bits, config)
    assert max(read) == 96
    for name in ("q", "scales", "zero_points"):
        a, b = getattr(whole, name), getattr(sliced, name)
        assert (a is None) == (b is None) and (a is None or (a.dtype == b.dtype and np.array_equal(a, b))), name


def _tied_graph(vocab: int, hidden: int) -> tuple[onnx.ModelProto, np.ndarray]:
    """ids -> Gather(embed) -> Mul -> MatMul(., Transpose(embed)) -> logits: a tied lm_head in miniature."""
    embed = RNG.standard_normal((vocab, hidden)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["embed", "ids"], ["x"], name="/model/embed_tokens/Gather", axis=0),
             helper.make_node("Mul", ["x", "two"], ["h"], name="/mul"),
             helper.make_node("Transpose", ["embed"], ["embed_t"], name="/lm_head/Transpose", perm=[1, 0]),
             helper.make_node("MatMul", ["h", "embed_t"], ["logits"], name="/lm_head/MatMul")]
    graph = helper.make_graph(
        nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, None])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, None, vocab])],
        initializer=[numpy_helper.from_array(embed, "embed"), numpy_helper.from_array(np.float32(2.0), "two")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), embed


def test_reference_runs_a_big_gather_and_tied_lm_head_in_row_slices(tmp_path, monkeypatch):
    model, embed = _tied_graph(1000, 64)
    feeds = [{"ids": np.array([[3, 999, 0, -1, 512, 3]], np.int64)}, {"ids": np.array([[7]], np.int64)}]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = [session.run(["logits"], f)[0] for f in feeds]
    # The embedding stored outside the protobuf, as the export stores it; slices of 100 rows.
    with DataFile(tmp_path / "m.data") as f:
        stored_embed = f.add("embed", embed)
    model.graph.initializer[0].CopyFrom(stored_embed)
    monkeypatch.setattr(segments, "ROW_SLICE_BYTES", 100 * 64 * 4)
    reads = []
    stored = StoredGraph(model, tmp_path)
    monkeypatch.setattr(StoredGraph, "read", lambda self, t: pytest.fail(f"{t.name} read whole"))
    original = segments.read_rows
    monkeypatch.setattr(segments, "read_rows", lambda *a: reads.append(a[-1] - a[-2]) or original(*a))
    outs, n_segments = run_segmented(stored, feeds, ["logits"], max_bytes=64 << 10)
    assert max(reads) == 100 and len(reads) == 20  # 10 slices for the gather, 10 for the lm_head
    assert n_segments == 3  # gather, Mul, lm_head (the Transpose folded into it)
    for (got,), want in zip(outs, expected):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert np.array_equal(got.argmax(-1), want.argmax(-1))
