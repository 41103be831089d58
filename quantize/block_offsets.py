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
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edge_infer.quantize.nbits import QuantizedLinear


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
        mt = numpy_helper.from_array(np.ascontiguousarray(m.T), weight + "_min")  # (n_blocks, N)
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
