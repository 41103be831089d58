"""Quantizing an export's float graph, with the source's own blocks where they fit (GGUF).

`quantize_model` is the one quantization step of every route that quantizes (the direct builder's
streamed graph, optimum-onnx's graph): it takes the source's blocks as one type, `SourceBlocks`
(none at all for a float source), and returns what it did as a `Quantized` record: the graph, the
quantization record's details, and which graph weights kept their source blocks or had their block
residuals folded (the GGUF import report reads those).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from edge_infer.export.graph import VOCAB_WEIGHTS, initializer_name
from edge_infer.export.progress import Progress
from edge_infer.export.spec import DecoderSpec

if TYPE_CHECKING:
    from edge_infer.export.export_folder import ExportOptions

# Where gguf_import "mixed" keeps the exact import.
MLP_WEIGHTS = (".gate_up.weight", ".up.weight", ".down.weight")
# gguf_import "folded": 8-bit blocks narrower than this holding values of at most 6 bits (Q6_K's blocks of 16,
# Q5_0's of 32: kept above a 4-bit export's width; Q8_0 keeps its own) are rounded again at 8 bits in blocks of
# this many. onnxruntime's kernels spend 11-19% less time on them at decode and 18-27% at prefill
# (benchmarks/RESULTS.md), for an rms error of 0.27x a Q6_K block's own rounding.
WIDE_8BIT_BLOCK = 64
# gguf_import "lean": 8-bit blocks of 16 holding 6-bit values (Q6_K) are left out of the source blocks, so the
# rewrite rounds those weights to the export's bits from the file's values. Measured on Qwen2.5-Coder-0.5B
# Q4_K_M (12 Q6_K ffn_down weights; benchmarks/RESULTS.md): perplexity x0.9988 llama.cpp's as with "folded",
# but KL to the file's weights 0.0061 against 0.0015 and top-1 agreement 94.9% against 98.2%; at 1.5B shapes
# 7% fewer bytes per token, decode +3% and peak RSS -90 MiB.
LEAN_BLOCK = 16


@dataclass(frozen=True)
class Quantized:
    """What `quantize_model` made."""

    model: onnx.ModelProto
    details: dict[str, Any]  # the quantization record's details (QuantRecord)
    kept: frozenset[str] = frozenset()  # graph weights whose source blocks were used as they are
    folded: frozenset[str] = frozenset()  # graph weights whose block residuals were folded into the weight
    widened: frozenset[str] = frozenset()  # graph weights whose 8-bit blocks were rounded again, wider


@dataclass
class SourceBlocks:
    """The source's quantized blocks the rewrite may use, computed per weight when the rewrite asks
    for it (`get`), so the blocks of the whole model are never in memory together. `lookup(canonical)`
    is (True, blocks or None for mixed types) for a weight with source blocks, (False, None) otherwise
    (checkpoint.LazyWeights.blocks). Fills `minimums` (residuals for quantize.block_offsets), `folded`,
    `kept` and `seen` (canonical name -> True, or None for mixed types) as it goes."""

    lookup: Callable[[str], tuple[bool, Any]]
    names: tuple[str, ...]  # the canonical weights of the source
    bits: int
    block_size: int
    gguf_import: str
    embed_bits: int = 8
    minimums: dict[str, np.ndarray] = field(default_factory=dict)
    folded: set[str] = field(default_factory=set)
    widened: set[str] = field(default_factory=set)  # 8-bit blocks rounded again in blocks of WIDE_8BIT_BLOCK
    seen: dict[str, object] = field(default_factory=dict)
    kept: set[str] = field(default_factory=set)
    used: int = 0

    @classmethod
    def of(cls, lookup: Callable[[str], tuple[bool, Any]], names, options: ExportOptions) -> SourceBlocks:
        return cls(lookup, tuple(names), 4 if options.quant == "int4" else 8, options.block_size, options.gguf_import)

    @classmethod
    def from_mapping(cls, blocks: Mapping[str, Any], options: ExportOptions) -> SourceBlocks:
        """From canonical name -> blocks (None: mixed types), as checkpoint.materialize returns them."""
        return cls.of(lambda c: (c in blocks, blocks.get(c)), blocks, options)

    @classmethod
    def none(cls, options: ExportOptions) -> SourceBlocks:
        """A float source: no blocks."""
        return cls.of(lambda c: (False, None), (), options)

    def __post_init__(self) -> None:
        self._canonical = {initializer_name(c): c for c in self.names}

    def get(self, name: str, default=None):
        canonical = self._canonical.get(name)
        if canonical is None:
            return default
        found, b = self.lookup(canonical)
        if not found:
            return default
        self.seen[canonical] = None if b is None else True
        if b is None:
            return default
        pre, minimums, folded, widened = source_blocks({canonical: b}, self.bits, self.embed_bits, self.block_size,
                                                       self.gguf_import)
        self.minimums.update(minimums)
        self.folded.update(folded)
        self.widened.update(widened)
        self.used += len(pre) - len(widened)
        if name in pre and name not in widened:
            self.kept.add(name)
        return pre.get(name, default)


def quantize_model(model: onnx.ModelProto, spec: DecoderSpec, blocks: SourceBlocks, options: ExportOptions,
                   progress: Progress, read=None, sink=None, read_rows=None) -> Quantized:
    """Quantize `model` as `options` ask, using `blocks` where they fit. Streaming: `read(tensor)` gives
    a float weight stored outside the protobuf, `read_rows(tensor, start, stop)` rows of one, and
    `sink(tensor)` moves each new tensor to the data file (quantize_graph)."""
    from edge_infer.quantize.rewrite import quantize_graph

    config = options.quant_config(spec)
    assert config is not None, "only int8/int4 exports are quantized"
    config.validate()
    blocks.embed_bits = {"int8": 8, "int4": 4}.get(config.embeddings_choice(), 0)
    progress.stage(f"quantizing to {options.quant} (block {options.block_size}, "
                   f"{'symmetric' if options.symmetric else 'asymmetric'})", unit="weight")
    bar = progress.bar("quantize", total=None)
    q = quantize_graph(model, config, prequantized=blocks, progress=bar.update, loader=read, sink=sink,
                       row_loader=read_rows)
    bar.close()
    if blocks.minimums:
        from edge_infer.quantize.block_offsets import add_block_offsets

        add_block_offsets(q, blocks.minimums, options.block_size)
    if blocks.folded:
        from edge_infer.quantize.block_offsets import add_block_sums

        add_block_sums(q, blocks.folded, options.block_size)
    info = _details(q, blocks, options, progress)
    return Quantized(q, info, frozenset(blocks.kept), frozenset(blocks.folded), frozenset(blocks.widened))


def _details(q: onnx.ModelProto, blocks: SourceBlocks, options: ExportOptions, progress: Progress) -> dict[str, Any]:
    """The quantization record's details: the rewrite's summary and what the source blocks became."""
    from edge_infer.quantize.rewrite import quantize_summary

    info: dict[str, Any] = {"summary": quantize_summary(q)}
    requantized = info["summary"].get("requantized") or []
    if requantized:
        progress.note(f"{len(requantized)} source-quantized weights did not match {options.quant} block "
                      f"{options.block_size} and were re-quantized (a second rounding)")
    if blocks.seen:
        info["gguf_import"] = options.gguf_import
    if blocks.minimums:
        info["gguf_q4_1"] = (f"{len(blocks.minimums)} Q4_1/Q4_K weights imported exactly "
                             "(integer zero point + block residual)")
    if blocks.folded:
        info["gguf_q4_1_folded"] = (f"{len(blocks.folded)} Q4_1/Q4_K weights imported with their block residuals "
                                    "folded into the weight (integer zero point + residual columns rounded once)")
    mixed = sorted(name for name, b in blocks.seen.items() if b is None)
    if mixed:
        info["mixed_source_types"] = mixed
        progress.note(f"{len(mixed)} fused weights combine source tensors of different quantization types; "
                      "they are quantized once from the exact float weights")
    if blocks.widened:
        info["gguf_8bit_widened"] = (f"{len(blocks.widened)} weights kept at 8 bits (Q6_K, Q5_0, ...) were rounded again "
                                     f"in 8-bit blocks of {WIDE_8BIT_BLOCK} (each weight within half a step of its new "
                                     "block: rms about 0.3x a Q6_K block's own rounding)")
    if blocks.used:
        info["source_blocks"] = f"{blocks.used} weights kept their source quantization where bits and block size matched"
    return info


def source_blocks(blocks: dict, bits: int, embed_bits: int, block_size: int,
                  gguf_import: str = "folded") -> tuple[dict, dict, set, set]:
    """GGUF blocks that the rewrite can use as they are, keyed by graph initializer name, plus the
    per-block residuals of scale-and-minimum formats (Q4_1, Q4_K) for quantize.block_offsets, the
    weights whose residuals were folded and those whose 8-bit blocks were widened.

    Usable: the asked bits with blocks that split exactly into `block_size` (32 -> 16), or more bits
    than asked (Q6_K, Q8_0 stay 8-bit). Anything else is left out, so the rewrite quantizes the
    exact float weights once instead of re-rounding blocks. gguf_import "mixed" also leaves out the
    attention weights that would need the residual branch; "requantize" leaves out every such
    weight and wider blocks (Q8_0 in an int4 export): every weight is then rounded to what was asked.
    "folded" (the default) also rounds narrower 8-bit blocks (Q6_K, Q5_0) again in blocks of WIDE_8BIT_BLOCK;
    "lean" does what "folded" does but leaves Q6_K's blocks out (LEAN_BLOCK).
    """
    from edge_infer.quantize.block_offsets import fold_minimum, split_minimum
    from edge_infer.quantize.nbits import split_blocks
    from edge_infer.quantize.rewrite import round_again

    pre: dict = {}
    minimums: dict = {}
    folded: set[str] = set()
    widened: set[str] = set()
    folding = gguf_import in ("folded", "lean")  # Q4_K residuals folded, narrower 8-bit blocks widened
    for canonical, b in blocks.items():
        if b is None:
            continue
        name, ql = initializer_name(canonical), _as_linear(b)
        target = embed_bits if canonical in VOCAB_WEIGHTS else bits
        exact_split = ql.bits == target and ql.block_size % block_size == 0
        if gguf_import == "lean" and ql.bits == 8 > target and ql.block_size == LEAN_BLOCK \
                and 32 <= int(ql.q.max(initial=0)) < 64:  # Q6_K: rounded to the export's bits instead
            continue
        if not (exact_split or (target and ql.bits > target and gguf_import != "requantize")):
            continue
        split = split_minimum(ql)
        if split is not None and not exact_split and ql.block_size != block_size:
            continue  # a minimum per block is added back at the export's block size only: round once instead
        fold = split is not None and folding and exact_split
        if split is not None:
            keep = gguf_import in ("exact", "folded", "lean") or (gguf_import == "mixed" and canonical.endswith(MLP_WEIGHTS))
            if canonical in VOCAB_WEIGHTS or not keep:  # (the embedding gather has no residual branch)
                continue
            if not fold:
                ql, minimums[name] = split
        if exact_split and ql.block_size != block_size:
            factor = ql.block_size // block_size
            ql = split_blocks(ql, block_size)
            if name in minimums:
                minimums[name] = np.repeat(minimums[name], factor, axis=1)
        if fold:
            folded_ql = fold_minimum(ql)
            if folded_ql is None:
                ql, minimums[name] = split_minimum(ql)  # type: ignore[misc]
            else:
                ql = folded_ql
                folded.add(name)
        if folding and ql.bits == 8 > target and ql.block_size < WIDE_8BIT_BLOCK \
                and name not in minimums and int(ql.q.max(initial=0)) < 64:  # (values of at most 6 bits: not Q8_0)
            ql = round_again(ql, 8, WIDE_8BIT_BLOCK)
            widened.add(name)
        pre[name] = ql
    return pre, minimums, folded, widened


def _as_linear(b):
    """Source blocks with the zero points MatMulNBits reads best (Q4_0 and Q8_0 map exactly; Q4_1
    goes through quantize.block_offsets, since a float zero point would leave onnxruntime's fast kernels)."""
    zp = b.zero_points
    if zp is not None and np.all(zp == 2 ** (b.bits - 1)):
        zp = None  # symmetric (Q4_0, Q8_0): MatMulNBits' implied zero point
    elif zp is not None and np.all(zp == np.round(zp)):
        zp = zp.astype(np.uint8)  # integer zero points (Q6_K: 32) as MatMulNBits' packed uint8
    return replace(b, zero_points=zp)
