"""The lm_head as a 4-bit scan of the vocabulary and an exact rescoring of its best candidates.

A decode step reads the whole lm_head: for Qwen2.5 (151936 x 896) an 8-bit table is 153 MB of a
0.5B model's 555 MB per token. `--lm-head rescore` keeps that 8-bit table (the embedding lookup
reads it too when tied) and adds a 4-bit copy of it (rounded to nearest, quantize/rewrite.py) that the
lm_head MatMulNBits scans instead (87 MB), then recomputes the logits of the scan's best
`candidates(vocab)` tokens from the 8-bit rows, in float, and writes them over the scan's:

    scan    = MatMulNBits(h, table4)                              (..., V)
    top     = TopK(scan, C).indices                               (..., C)
    rows    = GatherBlockQuantized(table8, top)                   (..., C, D)  only C rows are read
    exact   = FusedMatMul(h[..., None, :], rows, transB=1)        (..., C)  a dot product per candidate
    logits  = ScatterElements(scan, top, exact, axis=-1)

So every token the sampler can plausibly pick has its 8-bit logit (greedy picks the same token as
the 8-bit head whenever the 8-bit winner is among the scan's C best), and only the far tail keeps
the 4-bit estimate. Measured (benchmarks/RESULTS.md, Intel Xeon): decode x1.01-1.05 at Qwen2.5-Coder-0.5B
Q4_K_M and x1.03-1.04 on a 1.5B geometry (the rescoring's TopK, gather and products cost 1-2.5 ms of the
saved bytes' 3-7), perplexity x1.0007 of the 8-bit head's at 0.5B, KL to the file's fp32 weights 0.0013
(8-bit head 0.0007).
At SmolLM2-135M (vocabulary 49152, hidden 576) the head is a small part of a step and the rescoring
ate the gain, so `auto` picks it from RESCORE_MIN_VOCAB tokens up.

Every operation after the scan works on each row of logits alone (TopK, a gather, one vector-matrix
product per row: a batch of one-row GEMMs), so a row's logits do not depend on how many rows share the pass:
batch invariance rests on the scan MatMulNBits, which the padding probe checks like any other.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .nbits import MS_DOMAIN, NBitsNames, QuantizedLinear

RESCORE_MIN_VOCAB = 100_000  # `--lm-head auto`: rescore from this vocabulary size up, int8 below
MAX_CANDIDATES = 1024  # logits recomputed per row; perplexity x1.0007 at 1024, x1.0019 at 512 (0.5B)
# The scan is stored as row slices of at most this many bytes of 4-bit blocks, one MatMulNBits each,
# concatenated. onnxruntime keeps a weight's pages of the data file mapped while it packs that weight
# into its own buffer, so one 117 MB scan (1.5B) put its bytes on top of everything packed before it:
# peak RSS at load 1719 MiB against 1615 in four slices (Intel Xeon, onnxruntime 1.32). Slices start at
# multiples of SCAN_ROW_ALIGN rows, so a column keeps its place among the kernel's column tiles (16 wide
# at most) and its thread's share, and is summed by the same code over the same K: the logits are the same bits.
SCAN_PART_BYTES = 32 << 20
SCAN_ROW_ALIGN = 64


def candidates(vocab: int) -> int:
    """How many of a row's best scan logits are recomputed: MAX_CANDIDATES, or an eighth of a small
    vocabulary (a test model's), so that some logits always stay the scan's."""
    return max(1, min(MAX_CANDIDATES, vocab // 8))


def scan_parts(rows: int, row_bytes: int) -> list[tuple[int, int]]:
    """The [start, stop) row ranges the scan of `rows` rows of `row_bytes` packed bytes is stored in: slices
    of the most rows that fit SCAN_PART_BYTES, a multiple of SCAN_ROW_ALIGN (at least that many), the last
    taking the rest."""
    per_part = max(SCAN_ROW_ALIGN, SCAN_PART_BYTES // row_bytes // SCAN_ROW_ALIGN * SCAN_ROW_ALIGN)
    bounds = [*range(0, rows, per_part), rows]
    return list(zip(bounds[:-1], bounds[1:]))


def auto_choice(vocab: int) -> str:
    """What `--lm-head auto` means for a vocabulary of `vocab` tokens: "rescore" from RESCORE_MIN_VOCAB up."""
    return "rescore" if vocab >= RESCORE_MIN_VOCAB else "int8"


def per_block_rank3(tensors: list[TensorProto], names: NBitsNames) -> None:
    """Give the table's scales and zero points a trailing axis of 1, (V, n_blocks, 1): the rank
    GatherBlockQuantized wants for its 3-D (V, n_blocks, block) data. The embedding lookup reads
    them the same (it reshapes each gathered row to (n_blocks, 1) anyway)."""
    for t in tensors:
        if t.name in (names.scales, names.zero_points):
            t.dims.append(1)


def rescore_nodes(h: str, out: str, scan: str, table: QuantizedLinear,
                  names: NBitsNames) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """The nodes after the scan MatMulNBits (whose output is `scan`) that write the logits `out`.

    h: the hidden rows the lm_head reads, (..., D); `names` the 8-bit table's initializers, whose
    scales (and zero points) have rank 3 (per_block_rank3). The gathered rows come out in the
    scales' float type, the graph's."""
    base = "/lm_head/rescore"
    c = candidates(table.n)
    consts = {
        "k": np.array([c], np.int64),
        "last": np.array([-1], np.int64),
        "second_last": np.array([-2], np.int64),
        "row_shape": np.array([0] * 3 + [table.n_blocks * table.block_size], np.int64),  # (..., C, D_padded)
        "zero": np.array([0], np.int64),
        "d": np.array([table.k], np.int64),
    }
    inits = [numpy_helper.from_array(v, f"{base}/const_{k}") for k, v in consts.items()]
    nodes: list[onnx.NodeProto] = []

    def add(op: str, step: str, inputs: list[str], outputs: list[str] | None = None, **attrs) -> str:
        outs = outputs or [f"{base}/{step}/output_0"]
        nodes.append(helper.make_node(op, inputs, outs, name=f"{base}/{step}", **attrs))
        return outs[0]

    top = f"{base}/TopK/indices"
    add("TopK", "TopK", [scan, f"{base}/const_k"], [f"{base}/TopK/values", top], axis=-1, largest=1, sorted=0)
    table_inputs = [names.b, top, names.scales] + ([names.zero_points] if table.zero_points is not None else [])
    rows = add("GatherBlockQuantized", "GatherRows", table_inputs, domain=MS_DOMAIN, bits=table.bits,
               block_size=table.block_size, gather_axis=0, quantize_axis=2)  # (..., C, n_blocks, block)
    rows = add("Reshape", "Rows", [rows, f"{base}/const_row_shape"])  # (..., C, D_padded)
    if table.n_blocks * table.block_size != table.k:
        rows = add("Slice", "Unpad", [rows, f"{base}/const_zero", f"{base}/const_d", f"{base}/const_last"])
    hidden = add("Unsqueeze", "Hidden", [h, f"{base}/const_second_last"])  # (..., 1, D)
    # One dot product per candidate, reading the gathered rows once: a Mul and a ReduceSum wrote and
    # read them again (3.6 -> 3.1 ms per logits row at 1.5B, 22 -> 9.5 ms for 3 rows; RESULTS.md).
    dots = add("FusedMatMul", "Dot", [hidden, rows], domain=MS_DOMAIN, transB=1)  # (..., 1, C)
    exact = add("Squeeze", "Exact", [dots, f"{base}/const_second_last"])  # (..., C)
    add("ScatterElements", "Scatter", [scan, top, exact], [out], axis=-1)
    used = {name for node in nodes for name in node.input}
    return nodes, [t for t in inits if t.name in used]
