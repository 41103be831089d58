"""quantize.search: scales chosen for least squared error, in MatMulNBits' own format."""

from __future__ import annotations

import numpy as np
import pytest
from test_nbits import rel_err, run_matmul

from edge_infer.quantize.nbits import dequantize, quantize_rtn
from edge_infer.quantize.search import quantize_search


def block_errors(w: np.ndarray, ql, block_size: int) -> np.ndarray:
    """Squared error per (row, block)."""
    d = (w - dequantize(ql)[:, :w.shape[1]]) ** 2
    pad = -w.shape[1] % block_size
    return np.pad(d, ((0, 0), (0, pad))).reshape(w.shape[0], -1, block_size).sum(-1)


def weights(rng, n=70, k=200) -> np.ndarray:
    w = rng.standard_normal((n, k)).astype(np.float32)
    w[rng.random((n, k)) < 0.01] *= 8  # a few outliers, as real layers have
    w[3, :40] = 0.0  # an all-zero block
    w[5] = np.abs(w[5])  # a row with no negative weight
    return w


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("block_size", [16, 32, 128])
def test_never_worse_than_round_to_nearest_and_clearly_better_overall(symmetric, block_size):
    rng = np.random.default_rng(block_size + symmetric)
    w = weights(rng)
    rtn, searched = quantize_rtn(w, 4, block_size, symmetric), quantize_search(w, 4, block_size, symmetric)
    e_rtn, e_search = block_errors(w, rtn, block_size), block_errors(w, searched, block_size)
    assert (e_search <= e_rtn * (1 + 1e-5) + 1e-12).all()  # per block: the RTN candidate is always in the running
    assert e_search.sum() < 0.96 * e_rtn.sum()  # outlier blocks dominate both sums here; real layers gain ~30%
    assert np.all(dequantize(searched)[3, :32] == 0)  # zero blocks stay exact zeros


def test_weights_already_on_another_grid():
    """Dequantized Q4_1 blocks (a fractional zero point) are where round-to-nearest does worst:
    every weight lands the same distance off the new grid."""
    rng = np.random.default_rng(0)
    d = rng.uniform(0.01, 0.05, (64, 8, 1)).astype(np.float32)
    m = -d * rng.uniform(3.2, 11.7, (64, 8, 1)).astype(np.float32)
    w = (d * rng.integers(0, 16, (64, 8, 32)) + m).reshape(64, 256).astype(np.float32)
    e_rtn = block_errors(w, quantize_rtn(w, 4, 32), 32).sum()
    e_search = block_errors(w, quantize_search(w, 4, 32), 32).sum()
    assert e_search < 0.8 * e_rtn


@pytest.mark.parametrize("symmetric", [False, True])
def test_output_is_a_valid_matmulnbits_weight(symmetric):
    rng = np.random.default_rng(7)
    w, x = weights(rng, 37, 200), rng.standard_normal((5, 200)).astype(np.float32)
    ql = quantize_search(w, 4, 32, symmetric)
    assert ql.q.dtype == np.uint8 and ql.q.max() <= 15 and ql.scales.dtype == np.float32
    if symmetric:
        assert ql.zero_points is None
    else:
        assert ql.zero_points.dtype == np.uint8 and ql.zero_points.max() <= 15
    assert rel_err(run_matmul(ql, x, 0), x @ dequantize(ql).T) < 1e-5


def test_bits_checked():
    with pytest.raises(ValueError, match="bits"):
        quantize_search(np.ones((2, 32), np.float32), bits=3)


def test_export_rounding_choice():
    from edge_infer.quantize.config import QuantConfig

    assert QuantConfig(bits=4, block_size=32).rounding == "search"
    assert QuantConfig(bits=4, block_size=16).rounding == "search"
    assert QuantConfig(bits=4, block_size=64).rounding == "rtn"  # measured worse with the search
    assert QuantConfig(bits=4, block_size=32, method="rtn").rounding == "rtn"
