"""The quantized embedding lookup: rows of a MatMulNBits-layout table dequantized with standard ops.

The embedding gather is built from standard ops (Gather, BitShift, Unsqueeze, Concat, Reshape, Cast,
Sub, Mul, Slice; opset >= 13) rather than `com.microsoft.GatherBlockQuantized`, so that a tied table
is stored once (quantize/rewrite.py's module docstring says why).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .nbits import NBitsNames, QuantizedLinear


def embedding_nodes(
    gather: onnx.NodeProto, ql: QuantizedLinear, names: NBitsNames, dtype: type[np.floating]
) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """Standard-op subgraph: rows of B/scales/zero points -> float rows, output named like the Gather's.

    ids (batch, sequence_length) -> flat (T,) -> B rows (T, n_blocks, blob) -> values
    (T, n_blocks, block_size) -> (values - zp) * scale -> (T, K_padded) -> (T, D)
    -> (batch, sequence_length, D). Needs opset 13 (Unsqueeze with an axes input).
    """
    base = gather.name.rsplit("/", 1)[0] if "/" in gather.name else gather.name
    nb, bs, bits, d = ql.n_blocks, ql.block_size, ql.bits, ql.k
    zp_cols = -(-nb * bits // 8)  # packed zero-point bytes per row
    onnx_float = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    consts: dict[str, np.ndarray] = {
        "minus1": np.array([-1], np.int64),
        "four": np.array(4, np.uint8),
        "blocks": np.array([0, nb, bs], np.int64),  # (T, nb, bs)
        "rows": np.array([0, nb * bs], np.int64),  # (T, K_padded)
        "per_block": np.array([0, nb, 1], np.int64),  # (T, nb, 1)
        "zp_unpacked": np.array([0, 2 * zp_cols], np.int64),  # (T, 2 * zp_cols)
        "zero": np.array([0], np.int64),
        "one": np.array([1], np.int64),
        "d": np.array([d], np.int64),
        "nb": np.array([nb], np.int64),
        "zp": np.array(1 << (bits - 1), dtype),  # implied symmetric zero point
    }
    inits = [numpy_helper.from_array(v, f"{base}/const_{k}") for k, v in consts.items()]
    nodes: list[onnx.NodeProto] = []

    def c(key: str) -> str:
        return f"{base}/const_{key}"

    def add(op: str, step: str, inputs: list[str], **attrs: Any) -> str:
        out = f"{base}/{step}/output_0"
        nodes.append(helper.make_node(op, inputs, [out], name=f"{base}/{step}", **attrs))
        return out

    def unpack4(packed: str, step: str) -> str:
        """(T, ..., m) uint8 -> (T, ..., m, 2) with the low nibble first (element 2i)."""
        shifted = add("BitShift", f"{step}/Shl", [packed, c("four")], direction="LEFT")  # drops the high nibble
        lo = add("BitShift", f"{step}/Lo", [shifted, c("four")], direction="RIGHT")
        hi = add("BitShift", f"{step}/Hi", [packed, c("four")], direction="RIGHT")
        lo = add("Unsqueeze", f"{step}/LoPair", [lo, c("minus1")])
        hi = add("Unsqueeze", f"{step}/HiPair", [hi, c("minus1")])
        return add("Concat", f"{step}/Pairs", [lo, hi], axis=-1)

    ids = gather.input[1]
    flat = add("Reshape", "FlattenIds", [ids, c("minus1")])  # (T,)
    rows = add("Gather", "GatherB", [names.b, flat], axis=0)  # (T, nb, blob) uint8
    if bits == 4:
        rows = unpack4(rows, "UnpackB")  # (T, nb, blob, 2)
    values = add("Cast", "CastB", [add("Reshape", "Blocks", [rows, c("blocks")])], to=onnx_float)  # (T, nb, bs)

    if ql.zero_points is None:
        zp = c("zp")  # scalar 2**(bits-1)
    else:
        zp = add("Gather", "GatherZp", [names.zero_points, flat], axis=0)  # (T, zp_cols) or (T, nb)
        if ql.zero_points.dtype == np.uint8:
            if bits == 4:
                zp = add("Reshape", "ZpUnpacked", [unpack4(zp, "UnpackZp"), c("zp_unpacked")])  # (T, 2*zp_cols)
                zp = add("Slice", "ZpSlice", [zp, c("zero"), c("nb"), c("one")])  # (T, nb)
            zp = add("Cast", "CastZp", [zp], to=onnx_float)
        zp = add("Reshape", "ZpBlocks", [zp, c("per_block")])  # (T, nb, 1)
    scales = add("Gather", "GatherScales", [names.scales, flat], axis=0)  # (T, nb)
    scales = add("Reshape", "ScaleBlocks", [scales, c("per_block")])  # (T, nb, 1)

    w = add("Mul", "Scale", [add("Sub", "SubZp", [values, zp]), scales])  # (T, nb, bs)
    w = add("Reshape", "Rows", [w, c("rows")])  # (T, K_padded)
    w = add("Slice", "Unpad", [w, c("zero"), c("d"), c("one")])  # (T, D)
    shape = add("Concat", "OutShape", [add("Shape", "IdsShape", [ids]), c("d")], axis=0)  # ids.shape + (D,)
    nodes.append(helper.make_node("Reshape", [w, shape], [gather.output[0]], name=f"{base}/DequantizedRows"))
    used = {name for node in nodes for name in node.input}
    return nodes, [t for t in inits if t.name in used]
