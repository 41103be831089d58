"""Exact import of "scale and minimum" blocks (GGUF Q4_1) onto MatMulNBits' fast kernels.

A Q4_1 block stores w = d * q + m with a float minimum m per block. MatMulNBits
takes that as a float zero point -m/d, but onnxruntime then leaves its integer
kernels (measured 25x slower per MatMul here). Split the product instead:

    w = d * q + m = d * (q - z) + r,   z = round(-m / d) clipped to [0, 15],  r = m + d * z
    x @ W.T = x @ (d * (q - z)).T  +  blocksum(x) @ R.T

The first term is MatMulNBits with the integer zero point z (fast path, weights
centred as usual, so int8 activations lose no more than for any int4 model);
the second adds, per block b, the residual r[n, b] (|r| <= d / 2) times the sum
of x over that block:
a ReduceSum to (batch, seq, n_blocks) and a MatMul with M.T (n_blocks, N),
tiny next to the weight MatMul. The weights computed equal the GGUF's up to
float rounding; nothing is rounded a second time.

That branch is four small nodes and a float (n_blocks, N) matrix per weight: on a 135M model
the nodes cost a quarter of a decode step, on a 1.5B one the matrix adds a fifth to the bytes
read per token. The folded import (the default, `fold_minimum` / `add_block_sums`) puts R into
the weight itself as extra input columns, rounded to the weight's bits in blocks of their own,
and feeds the MatMulNBits [x, blocksum(x)] (a MatMul with a 0/1 matrix shared by the weights of
one K, or a ReduceSum where that matrix would be large, and a Concat): two small nodes instead of four, no float matrix per weight, and the
residuals are the only thing rounded (twice, hi and lo parts: at most max(d) / 450).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edge_infer.quantize.nbits import QuantizedLinear, dequantize, quantize_rtn


def split_minimum(ql: QuantizedLinear) -> tuple[QuantizedLinear, np.ndarray] | None:
    """(blocks with an integer zero point, block residuals R (N, n_blocks)) for a float-zero-point
    weight, else None. (q - zp) * s == (q - z) * s + (z - zp) * s for the integer z nearest zp."""
    zp = ql.zero_points
    if zp is None or zp.dtype != np.float32 or np.all(zp == np.round(zp)):
        return None
    z = np.clip(np.round(zp), 0, 2**ql.bits - 1)
    residuals = ((z - zp) * ql.scales).astype(np.float32)  # (N, n_blocks)
    return QuantizedLinear(bits=ql.bits, block_size=ql.block_size, q=ql.q, scales=ql.scales,
                           zero_points=z.astype(np.uint8), k=ql.k), residuals


def _float_dtype(graph: onnx.GraphProto, node: onnx.NodeProto) -> np.dtype:
    """The activations' dtype of a MatMulNBits node: its scales' (fp16 in an fp16 graph, else fp32)."""
    scales = next((t for t in graph.initializer if t.name == node.input[2]), None)
    return helper.tensor_dtype_to_np_dtype(scales.data_type) if scales is not None else np.dtype(np.float32)


def add_block_offsets(model: onnx.ModelProto, minimums: dict[str, np.ndarray], block_size: int) -> int:
    """Add blocksum(x) @ M.T after each MatMulNBits built from a weight in `minimums`; returns the count."""
    graph = model.graph
    by_weight = {}
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            for name in minimums:
                if node.input[1].startswith(name + "_Q"):
                    by_weight[name] = node
    rewritten, added = [], 0
    for node in graph.node:
        rewritten.append(node)
        weight = next((w for w, n in by_weight.items() if n is node), None)
        if weight is None:
            continue
        m = minimums[weight]  # (N, n_blocks)
        n_blocks = m.shape[1]
        base = node.name.rsplit("/", 1)[0] + "/block_min"
        shape = numpy_helper.from_array(np.array([0, 0, n_blocks, block_size], dtype=np.int64), base + "/shape")
        axes = numpy_helper.from_array(np.array([-1], dtype=np.int64), base + "/axes")
        mt = numpy_helper.from_array(np.ascontiguousarray(m.T, _float_dtype(graph, node)), weight + "_min")  # (n_blocks, N)
        graph.initializer.extend([shape, axes, mt])
        x, y = node.input[0], node.output[0]
        main = y + "/nbits"
        node.output[0] = main
        rewritten += [
            helper.make_node("Reshape", [x, shape.name], [base + "/x_blocks"], name=base + "/Reshape"),
            helper.make_node("ReduceSum", [base + "/x_blocks", axes.name], [base + "/x_sums"], name=base + "/ReduceSum",
                             keepdims=0),  # (batch, seq, n_blocks)
            helper.make_node("MatMul", [base + "/x_sums", mt.name], [base + "/offset"], name=base + "/MatMul"),
            helper.make_node("Add", [main, base + "/offset"], [y], name=base + "/Add"),
        ]
        added += 1
    del graph.node[:]
    graph.node.extend(rewritten)
    return added


def fold_minimum(ql: QuantizedLinear) -> QuantizedLinear | None:
    """The same weight with its block residuals folded into extra input columns, else None.

    Returns blocks of K + 2 * P columns (P = n_blocks rounded up to whole blocks): the first K are
    split_minimum's integer-zero-point blocks; the next P hold R (N, n_blocks) rounded to ql.bits
    in blocks of their own, and the last P what that rounding left over, rounded the same way. So
    one MatMulNBits over [x, blocksum(x), blocksum(x)] computes x @ W.T (add_block_sums builds
    that input). |R| <= d / 2, and two roundings of 2**bits - 1 steps leave at most max(d) / 450
    (4 bits) of it: a residual error is the same for the 32 weights of a block (a shift, which the
    block sum multiplies), so one rounding (max(d) / 30) measurably cost perplexity and two do not.
    A weight whose residuals exceed that bound (zero points clipped to the range) keeps the exact
    branch.
    """
    split = split_minimum(ql)
    if split is None:
        return None
    base, residuals = split
    if base.k != base.k_padded:  # GGUF rows are whole blocks; anything else keeps the exact branch
        return None
    steps = (1 << base.bits) - 1
    hi = quantize_rtn(residuals, base.bits, base.block_size, symmetric=False)  # (N, P) blocks
    left = residuals - dequantize(hi)
    lo = quantize_rtn(left, base.bits, base.block_size, symmetric=False)
    err = np.abs(dequantize(lo) - left).max(initial=0.0)
    if err > np.abs(base.scales).max(initial=0.0) / (2 * steps * steps) * 1.001:
        return None  # minimums outside the block's range (clipped zero points): keep the exact branch
    parts = (base, hi, lo)
    zps = [p.zero_points for p in parts]
    assert all(z is not None for z in zps)
    return QuantizedLinear(bits=base.bits, block_size=base.block_size, q=np.concatenate([p.q for p in parts], axis=1),
                           scales=np.concatenate([p.scales for p in parts], axis=1),
                           zero_points=np.concatenate(zps, axis=1),  # type: ignore[arg-type]
                           k=base.k + hi.k_padded + lo.k_padded)


def folded_columns(k: int, block_size: int) -> int:
    """Input columns a folded weight of in_features k reads: k, then its block sums twice, each
    padded with zeros to whole blocks."""
    n_blocks = -(-k // block_size)
    return k + 2 * (-(-n_blocks // block_size) * block_size)


INDICATOR_MAX_BYTES = 1 << 20  # a larger 0/1 matrix is not cache-resident: sum the blocks with ReduceSum


def add_block_sums(model: onnx.ModelProto, folded: set[str], block_size: int) -> int:
    """Feed each MatMulNBits built from a weight in `folded` with [x, sums, sums]; returns the count.

    The block sums (padded with zeros to whole blocks) are one MatMul with a 0/1 matrix shared by
    every weight of the same K, so it stays in cache; weights that read the same input share one
    branch (MatMul, Concat). Where that matrix would pass INDICATOR_MAX_BYTES (K 8960: 10 MB, read
    once per layer and token, 6% of a 1.5B decode step) the sums are a Reshape to blocks and a
    ReduceSum instead, which read only x (_summed_blocks).
    """
    graph = model.graph
    widened: dict[str, str] = {}  # input name -> its [x, sums, sums] name
    indicators: dict[int, str] = {}  # K -> the shared (K, P) 0/1 matrix
    rewritten, added = [], 0
    for node in graph.node:
        if node.op_type != "MatMulNBits" or not any(node.input[1].startswith(w + "_Q") for w in folded):
            rewritten.append(node)
            continue
        x = node.input[0]
        if x not in widened:
            wide = next(a.i for a in node.attribute if a.name == "K")
            k = next(k for k in range(block_size, wide, block_size) if folded_columns(k, block_size) == wide)
            n_blocks = k // block_size
            padded = -(-n_blocks // block_size) * block_size
            dtype = _float_dtype(graph, node)
            base = node.name.rsplit("/", 1)[0] + "/block_sums"
            widened[x] = base + "/x_and_sums"
            sums = base + "/sums"  # (batch, seq, P)
            if k % block_size == 0 and k * padded * dtype.itemsize > INDICATOR_MAX_BYTES:
                branch = _summed_blocks(graph, x, sums, base, n_blocks, padded, block_size)
            else:
                if k not in indicators:
                    ones = np.zeros((k, padded), dtype=dtype)  # (K, P), the activations' dtype
                    ones[:, :n_blocks] = np.repeat(np.eye(n_blocks, dtype=ones.dtype), block_size, axis=0)
                    indicators[k] = f"block_sums/indicator_{k}x{padded}"
                    graph.initializer.append(numpy_helper.from_array(ones, indicators[k]))
                branch = [helper.make_node("MatMul", [x, indicators[k]], [sums], name=base + "/MatMul")]
            rewritten += [*branch, helper.make_node("Concat", [x, sums, sums], [widened[x]], name=base + "/Concat",
                                                    axis=-1)]  # (batch, seq, K + 2 P)
        node.input[0] = widened[x]
        rewritten.append(node)
        added += 1
    del graph.node[:]
    graph.node.extend(rewritten)
    return added


def _summed_blocks(graph: onnx.GraphProto, x: str, sums: str, base: str, n_blocks: int, padded: int,
                   block_size: int) -> list[onnx.NodeProto]:
    """x (batch, seq, K) -> its block sums (batch, seq, P): Reshape to blocks, ReduceSum, zeros up to P."""
    consts = {"blocks": np.array([0, 0, n_blocks, block_size], np.int64), "last": np.array([-1], np.int64),
              "pads": np.array([0, 0, 0, 0, 0, padded - n_blocks], np.int64)}
    graph.initializer.extend(numpy_helper.from_array(v, f"{base}/const_{k}") for k, v in consts.items())
    summed = sums if padded == n_blocks else base + "/ReduceSum/output_0"
    nodes = [helper.make_node("Reshape", [x, base + "/const_blocks"], [base + "/Blocks/output_0"], name=base + "/Blocks"),
             helper.make_node("ReduceSum", [base + "/Blocks/output_0", base + "/const_last"], [summed],
                              name=base + "/ReduceSum", keepdims=0)]
    if padded != n_blocks:
        nodes.append(helper.make_node("Pad", [summed, base + "/const_pads"], [sums], name=base + "/Pad"))
    return nodes
