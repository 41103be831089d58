"""Block quantization for MatMulNBits: numpy reference vs onnxruntime, and error bounds."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edge_infer.quantize.nbits import (
    QuantizedLinear,
    dequantize,
    matmul_nbits,
    pack_bits,
    packed_b,
    quantize_rtn,
    unpack_bits,
)


def run_matmul(ql: QuantizedLinear, x: np.ndarray, accuracy_level: int, dtype=np.float32) -> np.ndarray:
    """x (M, K) -> onnxruntime MatMulNBits (M, N)."""
    node, inits = matmul_nbits("x", "y", "/test/MatMulNBits", ql, accuracy_level, prefix="w", dtype=dtype)
    t = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", t, ["M", ql.k])],
        [helper.make_tensor_value_info("y", t, ["M", ql.n])],
        inits,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    onnx.checker.check_model(model)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x.astype(dtype)})[0]


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [False, True])
def test_onnxruntime_matches_numpy(bits, block_size, symmetric):
    rng = np.random.default_rng(bits * 1000 + block_size + symmetric)
    n, k = 37, 200  # N odd, K not a multiple of any block size
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((5, k)).astype(np.float32)
    ql = quantize_rtn(w, bits, block_size, symmetric)
    assert ql.k == k and ql.k_padded == -(-k // block_size) * block_size
    ref = x @ dequantize(ql).T  # (M, N)
    assert rel_err(run_matmul(ql, x, 0), ref) < 1e-5
    assert rel_err(run_matmul(ql, x, 4), ref) < 2e-2  # int8 activations


def test_float_zero_points():
    # GGUF Q4_1 stores d * q + m: zero point -m / d as a float of the scales' type.
    rng = np.random.default_rng(1)
    n, k = 9, 96
    q = rng.integers(0, 16, (n, k), dtype=np.uint8)
    d = rng.uniform(0.01, 0.1, (n, 3)).astype(np.float32)
    m = rng.uniform(-0.5, 0.0, (n, 3)).astype(np.float32)
    ql = QuantizedLinear(4, 32, q, d, (-m / d).astype(np.float32), k)
    expected = q.reshape(n, 3, 32) * d[..., None] + m[..., None]
    np.testing.assert_allclose(dequantize(ql), expected.reshape(n, k), atol=1e-6)
    x = rng.standard_normal((4, k)).astype(np.float32)
    assert rel_err(run_matmul(ql, x, 0), x @ dequantize(ql).T) < 1e-5
    assert rel_err(run_matmul(ql, x, 4), x @ dequantize(ql).T) < 2e-2


def test_fp16_activations():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((16, 64)).astype(np.float32)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    ql = quantize_rtn(w, 4, 32)
    y = run_matmul(ql, x, 0, dtype=np.float16)
    assert y.dtype == np.float16
    assert rel_err(y.astype(np.float32), x @ dequantize(ql).T) < 5e-3


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("block_size", [16, 32, 256])
def test_error_at_most_half_a_step(bits, symmetric, block_size):
    rng = np.random.default_rng(3)
    n, k = 64, 300
    w = rng.standard_normal((n, k)).astype(np.float32) * rng.uniform(0.01, 10, (n, 1)).astype(np.float32)
    w[0, :] = np.abs(w[0, :])  # one-signed rows: 0 must still be representable
    w[1, :] = -np.abs(w[1, :])
    ql = quantize_rtn(w, bits, block_size, symmetric)
    err = np.abs(dequantize(ql) - w)  # (N, K)
    step = np.repeat(np.abs(ql.scales), block_size, axis=1)[:, :k]  # (N, K)
    assert np.all(err <= step / 2 * (1 + 1e-5) + 1e-7)
    assert ql.q.max() < 2**bits
    if symmetric:
        assert ql.zero_points is None
    else:
        assert ql.zero_points.dtype == np.uint8 and ql.zero_points.max() < 2**bits


def test_symmetric_uses_the_long_side():
    # One dominant negative weight: it lands on level -8 (q = 0) and the step is absmax / 8.
    w = np.linspace(-0.1, 0.1, 32, dtype=np.float32)[None, :].copy()
    w[0, 3] = -1.0
    ql = quantize_rtn(w, 4, 32, symmetric=True)
    assert ql.scales[0, 0] == pytest.approx(1.0 / 8)
    assert ql.q[0, 3] == 0
    # Mirrored: the scale turns negative (as in GGUF Q4_0) and the bound still holds.
    ql = quantize_rtn(-w, 4, 32, symmetric=True)
    assert ql.scales[0, 0] == pytest.approx(-1.0 / 8)
    assert np.abs(dequantize(ql) + w).max() <= 1.0 / 16 + 1e-7


@pytest.mark.parametrize("symmetric", [False, True])
def test_all_zero_blocks_and_padding(symmetric):
    w = np.zeros((3, 40), np.float32)
    w[2, 35] = 0.5  # second block of row 2; the rest is zero
    ql = quantize_rtn(w, 4, 32, symmetric)
    assert ql.scales[0, 0] == 0 and ql.k_padded == 64
    np.testing.assert_array_equal(dequantize(ql)[:2], 0.0)
    assert dequantize(ql)[2, 35] == pytest.approx(0.5)
    x = np.ones((1, 40), np.float32)
    np.testing.assert_allclose(run_matmul(ql, x, 0), x @ dequantize(ql).T, atol=1e-6)


def test_packing_layout():
    q = np.arange(32, dtype=np.uint8).reshape(1, 32) % 16
    ql = QuantizedLinear(4, 32, q, np.ones((1, 1), np.float32), None, 32)
    b = packed_b(ql)  # (N, n_blocks, blob)
    assert b.shape == (1, 1, 16)
    assert b[0, 0, 0] == 0x10 and b[0, 0, 1] == 0x32  # element 2i in the low nibble
    np.testing.assert_array_equal(unpack_bits(b, 4, 32).reshape(1, 32), q)
    zp = pack_bits(np.array([[1, 2, 3]], np.uint8), 4)  # odd count pads the last high nibble
    np.testing.assert_array_equal(zp, [[0x21, 0x03]])


def test_node_attributes_and_names():
    ql = quantize_rtn(np.ones((6, 50), np.float32), 4, 16)
    prefix = "model.layers.0.attn.qkv_proj.weight"
    node, inits = matmul_nbits("x", "y", "/model/layers.0/attn/qkv_proj/MatMulNBits", ql, prefix=prefix)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"K": 50, "N": 6, "bits": 4, "block_size": 16, "accuracy_level": 4}
    assert node.domain == "com.microsoft" and node.op_type == "MatMulNBits"
    assert [t.name for t in inits] == [
        "model.layers.0.attn.qkv_proj.weight_Q4",
        "model.layers.0.attn.qkv_proj.weight_scales",
        "model.layers.0.attn.qkv_proj.weight_zp",
    ]
    assert list(node.input) == ["x"] + [t.name for t in inits]
    assert [tuple(t.dims) for t in inits] == [(6, 4, 8), (6, 4), (6, 2)]
    assert inits[2].data_type == TensorProto.UINT8


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bits": 3},
        {"block_size": 48},
        {"q": np.zeros((2, 32), np.int8)},
        {"scales": np.ones((2, 2), np.float32)},
        {"k": 0},
        {"q": np.full((2, 32), 16, np.uint8)},
        {"zero_points": np.full((2, 1), 16, np.uint8)},
    ],
)
def test_invalid_layouts_rejected(kwargs):
    fields = {"bits": 4, "block_size": 32, "q": np.zeros((2, 32), np.uint8), "scales": np.ones((2, 1), np.float32),
              "zero_points": None, "k": 30}  # fmt: skip
    fields.update(kwargs)
    with pytest.raises(ValueError):
        QuantizedLinear(**fields)


@pytest.mark.parametrize("bits", [4, 8])
def test_absmax_blocks_round_within_half_a_step(bits):
    """The npu profile's signed blocks (zero point 0): every value within half a step, the largest
    magnitude of each block on the grid's edge, all-zero blocks exact."""
    from edge_infer.quantize.nbits import quantize_absmax

    rng = np.random.default_rng(5)
    w = rng.standard_normal((16, 96)).astype(np.float32)
    w[3, :32] = 0.0
    q, scales = quantize_absmax(w, bits, 32)  # (16, 96), (16, 3)
    top = 2 ** (bits - 1) - 1
    assert q.dtype == np.int8 and q.min() >= -top - 1 and q.max() <= top and scales.dtype == np.float32
    step = np.repeat(scales, 32, axis=1)  # (16, 96)
    assert np.all(np.abs(q * step - w) <= step / 2 * (1 + 1e-5) + 1e-7)
    assert np.all(np.abs(q).reshape(16, 3, 32).max(-1)[scales > 0] == top) and np.all(q[3, :32] == 0)
