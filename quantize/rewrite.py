"""Quantize a float decoder graph: MatMul -> MatMulNBits, embedding Gather -> dequantizing gather.

Conventions of the graphs our exporter writes (the contract this module relies on):
  * a linear layer is `MatMul(x, W)` with W an initializer of shape (K, N);
    node names read as paths (`/model/layers.0/attn/qkv_proj/MatMul`);
  * the token embedding is `/model/embed_tokens/Gather` = Gather(W_embed (V, D), input_ids);
  * the lm_head is `/lm_head/MatMul`; with tied embeddings its B input is the output of
    `/lm_head/Transpose` (perm [1, 0]) over W_embed.

Tied embeddings: one quantized tensor (uint8 B (V, n_blocks, blob), scales, zero points)
serves both the lm_head MatMulNBits and the embedding's dequantizing gather, so the
weights are stored once. Because it is one tensor, `QuantConfig.lm_head` must equal
`QuantConfig.embeddings` for a tied model (an lm_head named in `exclude` counts as "fp");
otherwise `quantize_graph` raises a UserError naming both fields. The exception is
lm_head "rescore" over int8 embeddings (quantize/rescore.py): the lm_head scans a 4-bit copy
and reads rows of the shared 8-bit table. "auto" picks rescore or int8 by vocabulary size.

The embedding gather is built from standard ops (Gather, BitShift, Unsqueeze, Concat,
Reshape, Cast, Sub, Mul, Slice; opset >= 13) rather than `com.microsoft.GatherBlockQuantized`.
On onnxruntime 1.32 GatherBlockQuantized does reproduce the rows when handed B reshaped
to 2-D (V, n_blocks * blob) with MatMulNBits' scales and packed zero points, but
MatMulNBits refuses a 2-D B, so sharing would need a Reshape that onnxruntime
constant-folds into a second in-memory copy; and it accepts no float zero points
(GGUF Q4_1). Gathering straight from the 3-D B avoids both.

Bias Adds stay separate nodes (MatMulNBits has an optional bias input; folding it in
is a possible later speedup).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from onnx import TensorProto, helper, numpy_helper

from edge_infer.contract.errors import UserError

from .nbits import (
    MS_DOMAIN,
    NBitsNames,
    QuantizedLinear,
    dequantize,
    matmul_nbits,
    nbits_initializers,
    quantize_rtn,
)
from .block_offsets import folded_columns
from .external import tensor_nbytes
from .config import CHOICES, EMBED_GATHER, LM_HEAD_CHOICES, LM_HEAD_MATMUL, LM_HEAD_TRANSPOSE, QuantConfig
from . import rescore
from .embedding_gather import embedding_nodes
from .search import quantize_search

log = logging.getLogger(__name__)

METADATA_KEY = "edge_infer.quantize"  # JSON record of what quantize_graph did

_FLOAT_TYPES: dict[int, type[np.floating]] = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


class Prequantized(Protocol):
    """Blocks imported from elsewhere, by float weight initializer name: a dict, or a lazy lookup
    (export/quantize_step.py SourceBlocks) asked once per weight."""

    def get(self, name: str, default: None = None, /) -> QuantizedLinear | None: ...


@dataclass(frozen=True)
class _Job:
    """One weight to quantize and the nodes that read it."""

    weight: str  # float initializer name; also the prefix of the new initializers
    bits: int
    matmul: onnx.NodeProto | None  # MatMul to replace (lm_head or a linear)
    gather: onnx.NodeProto | None  # embedding Gather to replace
    transposed: bool  # the initializer is (K, N): quantize its transpose
    rescore: bool = False  # the lm_head scans a 4-bit copy and rescores from these 8 bits (quantize/rescore.py)


def quantize_graph(
    model: onnx.ModelProto,
    config: QuantConfig,
    prequantized: Prequantized | None = None,
    progress: Callable[[int, int], None] | None = None,
    *,
    loader: Callable[[TensorProto], np.ndarray] | None = None,
    sink: Callable[[TensorProto], TensorProto] | None = None,
    row_loader: Callable[[TensorProto, int, int], np.ndarray] | None = None,
) -> onnx.ModelProto:
    """A copy of `model` with its linear layers (and embedding/lm_head) block-quantized.

    `prequantized` maps a float weight initializer's name to blocks imported from
    elsewhere (GGUF), oriented (N, K) = (out, in); they are used verbatim when
    their bits and block size match what the config asks for that tensor, and
    dequantized then re-quantized (logged and recorded) when they do not. It may be
    a lazy mapping: only `.get(name)` is called, once per weight, when that weight's turn comes.
    `progress(done, total)` is called after each tensor.

    Streaming (quantize.external): `loader` reads an externally stored float initializer,
    and `sink` takes each new initializer as it is made and returns the proto to keep
    (its bytes moved to a data file), so only one weight is in memory at a time. `row_loader(tensor,
    start, stop)` reads rows of one: an embedding-shaped (untransposed) weight is then read and
    rounded `ROUND_SLICE_ROWS` rows at a time (the same result, rows are rounded independently),
    so a vocabulary-sized one is never whole in float.
    """
    config.validate()
    originals = {t.name: t for t in model.graph.initializer}
    out = _copy_without_initializers(model)
    graph = out.graph
    opset = next((op.version for op in model.opset_import if op.domain in ("", "ai.onnx")), 0)
    jobs, tied, config = _plan(graph, originals, config, opset)
    # Copy every initializer except the float weights about to be replaced (they can be large).
    replaced = {job.weight for job in jobs}
    graph.initializer.extend(t for name, t in originals.items() if name not in replaced)
    inits = dict(originals)

    new_nodes: dict[str, list[onnx.NodeProto]] = {}  # first output of an old node -> replacement nodes
    requantized: list[str] = []
    for done, job in enumerate(jobs, start=1):
        ql = _obtain(job, inits[job.weight], config, prequantized or {}, requantized, loader, row_loader)
        new_nodes.update(_rewrite(job, ql, graph, inits, config, sink))
        if progress is not None:
            progress(done, len(jobs))

    # Replace nodes in place so the graph stays topologically sorted.
    rewritten = []
    for node in graph.node:
        rewritten.extend(new_nodes.get(node.output[0], [node]) if node.output else [node])
    del graph.node[:]
    graph.node.extend(rewritten)
    _remove_dead(graph, replaced, originals)

    if jobs and not any(op.domain == MS_DOMAIN for op in out.opset_import):
        out.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    record = {
        "config": {**asdict(config), "exclude": list(config.exclude)},
        "tied_embeddings": tied,
        "embeddings": config.embeddings_choice(),
        "lm_head": config.lm_head_choice(),
        "requantized": requantized,
        "rounding": config.rounding,
        "float_bytes_replaced": sum(tensor_nbytes(inits[j.weight]) for j in jobs),
    }
    for prop in [p for p in out.metadata_props if p.key == METADATA_KEY]:
        out.metadata_props.remove(prop)
    out.metadata_props.add(key=METADATA_KEY, value=json.dumps(record, sort_keys=True))
    return out


def decide_lm_head(model: onnx.ModelProto, config: QuantConfig) -> QuantConfig:
    """`config` with `lm_head="auto"` decided for `model`'s vocabulary and tying, as quantize_graph decides it
    (for the manifest's record of a graph quantized with `config`)."""
    opset = next((op.version for op in model.opset_import if op.domain in ("", "ai.onnx")), 0)
    return _plan(model.graph, {t.name: t for t in model.graph.initializer}, config.validate(), opset)[2]


def _rewrite(job: _Job, ql: QuantizedLinear, graph: onnx.GraphProto, inits: dict[str, TensorProto],
             config: QuantConfig, sink: Callable[[TensorProto], TensorProto] | None) -> dict[str, list[onnx.NodeProto]]:
    """Add `job`'s quantized initializers to `graph` (through `sink`) and return the nodes that replace
    its MatMul and Gather, keyed by the replaced node's first output."""
    dtype = _FLOAT_TYPES[inits[job.weight].data_type]
    names, tensors = nbits_initializers(ql, job.weight, dtype)
    scan: list[tuple[QuantizedLinear, NBitsNames]] | None = None
    if job.rescore:  # the 8-bit table stays for the rescoring; the lm_head scans a 4-bit copy of it
        rescore.per_block_rank3(tensors, names)
        # The copy the lm_head scans: the table's rows rounded to nearest at 4 bits. (Its blocks stay the export's:
        # 4-bit blocks of 64 or more scan faster but are not row-invariant on the Intel Xeon, devices/invariance.py.)
        # Stored in row slices (rescore.scan_parts: what onnxruntime holds at once while it packs them).
        scan_ql = round_again(ql, 4, config.block_size)
        parts = rescore.scan_parts(scan_ql.n, scan_ql.k_padded * 4 // 8)
        scan = []
        for i, (start, stop) in enumerate(parts):
            part = scan_ql if len(parts) == 1 else scan_ql.take_rows(np.arange(start, stop))
            part_names, part_tensors = nbits_initializers(part, f"{job.weight}.scan" + (f"{i}" if len(parts) > 1 else ""),
                                                          dtype)
            tensors += part_tensors
            scan.append((part, part_names))
        del scan_ql
    for t in tensors:
        if t.name in inits:
            raise UserError(f"cannot quantize {job.weight}: the graph already has an initializer named {t.name}")
        if sink is not None:
            t = sink(t)
        inits[t.name] = t
        graph.initializer.append(t)
    del tensors
    new_nodes: dict[str, list[onnx.NodeProto]] = {}
    if job.matmul is not None:
        nodes, sub_inits = _lm_head_nodes(job.matmul, ql, names, scan, config, dtype)
        graph.initializer.extend(sub_inits if sink is None else [sink(t) for t in sub_inits])
        new_nodes[job.matmul.output[0]] = nodes
    if job.gather is not None:
        sub_nodes, sub_inits = embedding_nodes(job.gather, ql, names, dtype)
        graph.initializer.extend(sub_inits if sink is None else [sink(t) for t in sub_inits])
        new_nodes[job.gather.output[0]] = sub_nodes
    return new_nodes


def _lm_head_nodes(node: onnx.NodeProto, ql: QuantizedLinear, names: NBitsNames,
                   scan: list[tuple[QuantizedLinear, NBitsNames]] | None, config: QuantConfig,
                   dtype: type[np.floating]) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """What replaces a linear MatMul: one MatMulNBits, or for an lm_head 'rescore' the scan (one
    MatMulNBits per row slice, concatenated) and the rescoring of its best candidates (quantize/rescore.py)."""
    if scan is None:
        node_name = node.name + "NBits" if node.name.endswith("MatMul") else node.name + "/MatMulNBits"
        nbits_node, _ = matmul_nbits(node.input[0], node.output[0], node_name, ql, config.accuracy_level,
                                     dtype=dtype, prefix="", b_names=names)
        return [nbits_node], []
    scan_out = "/lm_head/scan/output_0"
    paths = ["/lm_head/scan"] if len(scan) == 1 else [f"/lm_head/scan/part{i}" for i in range(len(scan))]
    outs = [scan_out] if len(scan) == 1 else [f"{p}/output_0" for p in paths]
    nodes = [matmul_nbits(node.input[0], out, f"{p}/MatMulNBits", part, config.accuracy_level, dtype=dtype,
                          prefix="", b_names=part_names)[0] for p, out, (part, part_names) in zip(paths, outs, scan)]
    if len(scan) > 1:
        nodes.append(helper.make_node("Concat", outs, [scan_out], name="/lm_head/scan/Concat", axis=-1))  # (..., V)
    rest, inits = rescore.rescore_nodes(node.input[0], node.output[0], scan_out, ql, names)
    return [*nodes, *rest], inits


def _plan(
    graph: onnx.GraphProto, inits: dict[str, TensorProto], config: QuantConfig, opset: int
) -> tuple[list[_Job], bool, QuantConfig]:
    """Which weights to quantize, at which bits, for which nodes; whether embeddings are tied; and the
    config with `lm_head="auto"` decided."""
    by_name = {n.name: n for n in graph.node if n.name}
    gather = by_name.get(EMBED_GATHER)
    if gather is not None and not (gather.op_type == "Gather" and _is_float_weight(inits.get(gather.input[0]))):
        gather = None
    embed = gather.input[0] if gather is not None else None
    lm_head = by_name.get(LM_HEAD_MATMUL)
    transpose = by_name.get(LM_HEAD_TRANSPOSE)
    tied = (
        embed is not None
        and lm_head is not None
        and transpose is not None
        and transpose.op_type == "Transpose"
        and transpose.input[0] == embed
        and lm_head.input[1] == transpose.output[0]
        and [list(a.ints) for a in transpose.attribute if a.name == "perm"] in ([[1, 0]], [])
    )

    if lm_head is not None:
        head = inits.get(embed or "") if tied else inits.get(lm_head.input[1])
        vocab = (head.dims[0] if tied else head.dims[-1]) if head is not None and len(head.dims) == 2 else 0
        config = config.for_vocab(int(vocab), tied)
    jobs: list[_Job] = []
    embed_bits = CHOICES[config.embeddings_choice()]
    rescoring = config.lm_head_choice() == "rescore"
    if tied:
        assert embed is not None
        if rescoring and config.embeddings_choice() != "int8":
            raise UserError(
                f"lm_head 'rescore' recomputes its best logits from an 8-bit table, which this model shares with its "
                f"embeddings (tied): use embeddings int8 with it (got embeddings={config.embeddings_choice()!r})"
            )
        if config.lm_head_choice() != config.embeddings_choice() and not rescoring:
            raise UserError(
                f"this model ties its lm_head to the embeddings, so both share one tensor: set lm_head to the "
                f"same value as embeddings (got embeddings={config.embeddings_choice()!r}, "
                f"lm_head={config.lm_head_choice()!r})"
            )
        if embed_bits is not None:
            jobs.append(_Job(embed, embed_bits, lm_head, gather, transposed=False, rescore=rescoring))
    elif embed is not None and embed_bits is not None:
        jobs.append(_Job(embed, embed_bits, None, gather, transposed=False))
    if embed is not None and embed_bits is not None and opset < 13:
        raise UserError(
            f"quantized embeddings need ONNX opset 13 or newer (the graph has {opset}): "
            "re-export, or set embeddings='fp'"
        )

    readers: dict[str, int] = {}
    for node in graph.node:
        for name in set(node.input):
            readers[name] = readers.get(name, 0) + 1
    for node in graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        weight = node.input[1]
        if not _is_float_weight(inits.get(weight)) or config._excluded(node.name):
            continue
        head = node.name == LM_HEAD_MATMUL
        bits = LM_HEAD_CHOICES[config.lm_head_choice()] if head else config.bits
        if bits is None:
            continue
        if readers[weight] > 1:
            log.info("weight %s feeds several nodes; keeping it in float", weight)
            continue
        jobs.append(_Job(weight, bits, node, None, transposed=True, rescore=head and rescoring))
    return jobs, tied, config


def _reads_vocab(job: _Job) -> bool:
    """The embedding table or the lm_head: their width is `QuantConfig.embeddings`/`lm_head`, asked for by
    name, so an imported wider block is rounded to it rather than kept."""
    return job.gather is not None or (job.matmul is not None and job.matmul.name == LM_HEAD_MATMUL)


def _obtain(
    job: _Job,
    tensor: TensorProto,
    config: QuantConfig,
    prequantized: Prequantized,
    requantized: list[str],
    loader: Callable[[TensorProto], np.ndarray] | None = None,
    row_loader: Callable[[TensorProto, int, int], np.ndarray] | None = None,
) -> QuantizedLinear:
    """The quantized (N, K) weight for a job: imported blocks when they fit, else rounded here."""
    dims = tuple(tensor.dims)
    n, k = (dims[1], dims[0]) if job.transposed else dims  # W (K, N) or W_embed (V, D)
    pre = prequantized.get(job.weight)
    if pre is not None:
        if pre.n != n or pre.k not in (k, folded_columns(k, pre.block_size)):  # (block sums folded in)
            raise ValueError(f"prequantized {job.weight} is (N={pre.n}, K={pre.k}), the graph needs ({n}, {k})")
        if pre.bits == job.bits and pre.block_size == config.block_size:
            return pre
        if pre.bits > job.bits and not _reads_vocab(job):  # e.g. a GGUF's Q6_K/Q8_0 linears in an int4
            return pre  # export: kept exact, at 8 bits (the embeddings/lm_head width is the user's own choice)
        log.info(
            "%s: imported as %d-bit blocks of %d, re-quantizing to %d-bit blocks of %d (a second rounding)",
            job.weight, pre.bits, pre.block_size, job.bits, config.block_size,
        )  # fmt: skip
        requantized.append(job.weight)
        return _round(dequantize(pre), job.bits, config)
    if tensor.data_location == TensorProto.EXTERNAL and row_loader is not None and not job.transposed \
            and n > ROUND_SLICE_ROWS:
        return _round_in_slices(lambda start, stop: row_loader(tensor, start, stop), n, job.bits, config)
    if tensor.data_location == TensorProto.EXTERNAL:
        if loader is None:
            raise UserError(f"initializer {job.weight} is stored externally: "
                            "load the model with its external data first")
        w = loader(tensor)
    else:
        w = numpy_helper.to_array(tensor)
    w = w.astype(np.float32, copy=False)  # (K, N) or (V, D)
    return _round(w.T if job.transposed else w, job.bits, config)


RTN_ROWS = 4096  # rows rounded at a time: rounding's temporaries stay a few times one slice, not the tensor
ROUND_SLICE_ROWS = 4 * RTN_ROWS  # rows of a weight read (in float) at a time when it can be read in rows


def _round_in_slices(rows: Callable[[int, int], np.ndarray], n: int, bits: int, config: QuantConfig) -> QuantizedLinear:
    """`_round` of an (n, K) weight read ROUND_SLICE_ROWS rows at a time (`rows(start, stop)`), into
    arrays allocated once: equal to rounding the whole weight, since every row is rounded on its own."""
    arrays: list[np.ndarray | None] = []
    first: QuantizedLinear | None = None
    for start in range(0, n, ROUND_SLICE_ROWS):
        w = rows(start, min(n, start + ROUND_SLICE_ROWS)).astype(np.float32, copy=False)
        part = _round(w, bits, config)
        del w
        values = (part.q, part.scales, part.zero_points)
        if first is None:
            first = part
            arrays = [None if a is None else np.empty((n,) + a.shape[1:], a.dtype) for a in values]
        for whole, a in zip(arrays, values):
            if whole is not None and a is not None:
                whole[start:start + a.shape[0]] = a
    assert first is not None and arrays[0] is not None and arrays[1] is not None
    return QuantizedLinear(bits=first.bits, block_size=first.block_size, q=arrays[0], scales=arrays[1],
                           zero_points=arrays[2], k=first.k)


def round_again(ql: QuantizedLinear, bits: int, block_size: int) -> QuantizedLinear:
    """`ql`'s float values rounded again, to nearest and asymmetric, at `bits` in blocks of `block_size`,
    a slice of rows at a time (the lm_head's scan copy; a GGUF's narrow 8-bit blocks widened)."""
    config = QuantConfig(bits=bits, block_size=block_size, symmetric=False, method="rtn")
    return _round_in_slices(lambda start, stop: ql.take_rows(np.arange(start, stop)).dequantize(), ql.n, bits, config)


def _round(w: np.ndarray, bits: int, config: QuantConfig) -> QuantizedLinear:
    if not (bits == 8 or config.rounding == "rtn"):
        return quantize_search(w, bits, config.block_size, config.symmetric)  # (works in slices of rows)
    # 8-bit rounding error is already ~16x below 4-bit's. Rows are independent: round slice by slice,
    # on a small thread pool (numpy releases the GIL), as quantize_search does.
    starts = range(0, w.shape[0], RTN_ROWS)
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        parts = list(pool.map(lambda i: quantize_rtn(w[i:i + RTN_ROWS], bits, config.block_size, config.symmetric),
                              starts))
    if len(parts) == 1:
        return parts[0]
    zps = [p.zero_points for p in parts if p.zero_points is not None]
    return QuantizedLinear(bits=bits, block_size=config.block_size, q=np.concatenate([p.q for p in parts]),
                           scales=np.concatenate([p.scales for p in parts]),
                           zero_points=np.concatenate(zps) if zps else None, k=parts[0].k)


def _remove_dead(graph: onnx.GraphProto, replaced: set[str], originals: Mapping[str, TensorProto]) -> None:
    """Drop the tied Transpose once nothing reads it; restore a replaced float weight something still reads."""
    graph_outputs = {o.name for o in graph.output}
    used = _used_names(graph) | graph_outputs
    dead = [n for n in graph.node if n.name == LM_HEAD_TRANSPOSE and not set(n.output) & used]
    for n in dead:
        graph.node.remove(n)
    used = _used_names(graph) | graph_outputs
    graph.initializer.extend(originals[name] for name in sorted(replaced & used))
    gone = (replaced - used) | {name for n in dead for name in n.output}
    for field in (graph.input, graph.value_info):
        for v in [v for v in field if v.name in gone]:
            field.remove(v)


def _copy_without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy of `model` except its graph's initializers (copied selectively by the caller)."""
    out = onnx.ModelProto()
    for fd, value in model.ListFields():
        if fd.name != "graph":
            _copy_field(out, fd, value)
    for fd, value in model.graph.ListFields():
        if fd.name != "initializer":
            _copy_field(out.graph, fd, value)
    return out


def _copy_field(dst: Message, fd: FieldDescriptor, value: object) -> None:
    if fd.is_repeated:  # protobuf >= 5 (onnx requires >= 6)
        getattr(dst, fd.name).extend(value)  # copies message elements
    elif fd.message_type is not None:
        getattr(dst, fd.name).CopyFrom(value)
    else:
        setattr(dst, fd.name, value)


def _used_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a node reads, including inside subgraphs (If/Loop bodies)."""
    used: set[str] = set()
    for node in graph.node:
        used.update(node.input)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                used |= _used_names(sub)
    return used


def _is_float_weight(t: TensorProto | None) -> bool:
    return t is not None and t.data_type in _FLOAT_TYPES and len(t.dims) == 2


def quantize_summary(model: onnx.ModelProto) -> dict:
    """Counts of quantized / kept linear nodes and weight bytes before/after, for the manifest."""
    inits = {t.name: t for t in model.graph.initializer}
    nodes = list(model.graph.node)
    by_bits: dict[str, int] = {}
    quantized_bytes: set[str] = set()
    for n in nodes:
        if n.op_type == "MatMulNBits":
            bits = next(a.i for a in n.attribute if a.name == "bits")
            by_bits[str(bits)] = by_bits.get(str(bits), 0) + 1
            quantized_bytes.update(name for name in n.input[1:] if name in inits)
        elif n.op_type == "GatherBlockQuantized":  # the 8-bit table an lm_head 'rescore' reads rows of
            quantized_bytes.update(name for name in n.input if name in inits)
        elif n.op_type == "Gather" and n.name.endswith(("/GatherB", "/GatherScales", "/GatherZp")):
            quantized_bytes.add(n.input[0])  # the quantized embedding (shared with the lm_head when tied)
            base = n.name.rsplit("/", 1)[0]
            quantized_bytes.update(name for name in inits if name.startswith(f"{base}/const_"))
    kept = [n.name for n in nodes if n.op_type == "MatMul" and (_is_float_weight(inits.get(n.input[1]))
                                                                or n.name == LM_HEAD_MATMUL)]  # fmt: skip
    record: dict[str, Any] = next((json.loads(p.value) for p in model.metadata_props if p.key == METADATA_KEY), {})
    after = sum(tensor_nbytes(t) for t in inits.values())
    added = sum(tensor_nbytes(inits[name]) for name in quantized_bytes)
    before = after - added + int(record.get("float_bytes_replaced", 0))
    return {
        "quantized_nodes": sum(by_bits.values()),
        "quantized_by_bits": by_bits,
        "kept_float_nodes": len(kept),
        "kept_float_names": kept,
        "embeddings": record.get("embeddings", "fp"),
        "lm_head": record.get("lm_head", "fp"),
        "tied_embeddings": record.get("tied_embeddings"),
        "requantized": record.get("requantized", []),
        "rounding": record.get("rounding"),
        "config": record.get("config"),
        "bytes_before": before,
        "bytes_after": after,
    }
