"""Run a big graph a segment at a time, so its weights never sit in memory together.

Validation compares an int8/int4 export against the float graph of the same weights. At 1B
parameters that float graph is 4.3 GB: an onnxruntime session over it holds all of it (and a
memory map of its external data counts in RSS just the same). Instead the graph's nodes, in
their topological order, are cut into consecutive segments of at most `max_bytes` of weights;
each segment becomes a small model whose inputs are the graph inputs and earlier values it
reads and whose outputs are the values later segments (or the graph's outputs) need. The
segments run one after another on every prompt, each session freed before the next is made,
and the values between them are a few hidden states per prompt. The logits equal the whole
graph's up to onnxruntime's float rounding (the same kernels, fused per segment instead of
across the whole graph).

A weight bigger than a segment's budget is not read whole when it is a vocabulary-sized
embedding: its Gather runs here in numpy, a slice of rows at a time, and a MatMul by its
transpose (a tied lm_head) computes the logits a slice of the vocabulary at a time
(`_row_steps`), so neither the fp32 matrix nor its transpose is ever in memory whole.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from edge_infer.quantize.external import read_rows, read_tensor, tensor_nbytes

DEFAULT_MAX_BYTES = 256 << 20
ROW_SLICE_BYTES = 64 << 20  # rows of a vocabulary-sized weight read at a time (fp32)


def plan_segments(graph: onnx.GraphProto, max_bytes: int = DEFAULT_MAX_BYTES,
                  alone: Mapping[str, Any] | None = None) -> list[list[onnx.NodeProto]]:
    """Consecutive runs of nodes whose initializers add up to at most `max_bytes` (a single node
    with more weights than that gets a segment of its own; a node that adds no weights stays in
    the current one). Nodes in `alone` (keyed by their first output) get a segment of their own;
    nodes it maps to None are left out (their work is done by another node's step)."""
    alone = alone or {}
    sizes = {t.name: tensor_nbytes(t) for t in graph.initializer}
    segments: list[list[onnx.NodeProto]] = [[]]
    held: set[str] = set()
    total = 0
    for node in graph.node:
        if _key(node) in alone:
            if alone[_key(node)] is not None:
                segments += [[node], []]
                held, total = set(), 0
            continue
        new = {n for n in node.input if n in sizes and n not in held}
        extra = sum(sizes[n] for n in new)
        if segments[-1] and extra and total + extra > max_bytes:
            segments.append([])
            held, total = set(), 0
            new = {n for n in node.input if n in sizes}
            extra = sum(sizes[n] for n in new)
        segments[-1].append(node)
        held |= new
        total += extra
    return [s for s in segments if s]


@dataclass(frozen=True)
class StoredGraph:
    """A graph whose initializers are inline, external data in `folder`, or deferred (computed
    from the model's source when read, see quantize.external.DataFile.defer)."""

    model: onnx.ModelProto
    folder: Path
    deferred: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, graph_path: Path) -> StoredGraph:
        return cls(onnx.load(str(graph_path), load_external_data=False), Path(graph_path).parent)

    def read(self, t: TensorProto) -> np.ndarray:
        return read_tensor(t, self.folder, self.deferred)

    def read_rows(self, t: TensorProto, start: int, stop: int) -> np.ndarray:
        """Rows start:stop of `read(t)`, reading only those where the storage allows."""
        return read_rows(t, self.folder, self.deferred, start, stop)


@dataclass(frozen=True)
class _RowStep:
    """A node run here over row slices of a big weight (`weight`, (V, D)): "gather" (Gather on axis 0
    of the weight) or "matmul_t" (MatMul(x, Transpose(weight)), the Transpose folded in)."""

    kind: str
    node: onnx.NodeProto
    weight: str

    def reads(self) -> list[str]:
        """The values (not weights) it reads."""
        return [self.node.input[1 if self.kind == "gather" else 0]]


def _key(node: onnx.NodeProto) -> str:
    """A node's identity across walks of the graph (protobuf may hand out a new wrapper each time)."""
    return node.output[0] if node.output else ""


def _row_steps(graph: onnx.GraphProto, inits: Mapping[str, TensorProto], max_bytes: int) -> dict[str, Any]:
    """Nodes over weights above `max_bytes` that run a row slice at a time (first output -> _RowStep),
    and the Transposes they fold in (-> None)."""
    def big(name: str) -> bool:
        t = inits.get(name)
        return (t is not None and len(t.dims) == 2 and tensor_nbytes(t) > max_bytes
                and t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16))

    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    producer = {o: node for node in graph.node for o in node.output}
    steps: dict[str, Any] = {}
    for node in graph.node:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if node.op_type == "Gather" and node.domain in ("", "ai.onnx") and axis == 0 and big(node.input[0]) \
                and node.input[1] not in inits:
            steps[_key(node)] = _RowStep("gather", node, node.input[0])
        elif node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and node.input[1] in producer:
            t = producer[node.input[1]]
            perm = [list(a.ints) for a in t.attribute if a.name == "perm"]
            if (t.op_type == "Transpose" and perm in ([[1, 0]], []) and big(t.input[0])
                    and readers.get(t.output[0]) == 1 and t.output[0] not in outputs):
                steps[_key(node)] = _RowStep("matmul_t", node, t.input[0])
                steps[_key(t)] = None
    return steps


def _run_row_step(step: _RowStep, stored: StoredGraph, t: TensorProto, values: list[dict[str, np.ndarray]]) -> None:
    """Run `step` on every feed's values, reading the weight a slice of rows at a time."""
    rows, cols = (int(d) for d in t.dims)
    dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
    per = max(1, ROW_SLICE_BYTES // max(1, cols * dtype.itemsize))
    out = []
    for v in values:
        x = v[step.reads()[0]]
        if step.kind == "gather":
            ids = np.where(x < 0, x + rows, x).astype(np.int64)
            out.append((ids, np.empty(ids.shape + (cols,), dtype)))
        else:
            out.append((x, np.empty(x.shape[:-1] + (rows,), np.result_type(x.dtype, dtype))))
    for start in range(0, rows, per):
        stop = min(rows, start + per)
        w = stored.read_rows(t, start, stop)
        for x, o in out:
            if step.kind == "gather":
                hit = (x >= start) & (x < stop)
                o[hit] = w[x[hit] - start]
            else:
                o[..., start:stop] = x @ w.T
        del w
    for v, (_, o) in zip(values, out):
        v[step.node.output[0]] = o


def run_segmented(stored: StoredGraph, feeds: list[dict[str, np.ndarray]], outputs: list[str],
                  max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[list[list[np.ndarray]], int]:
    """`outputs` of the stored graph for each feed, computed segment by segment; returns (per
    feed, the output arrays in order) and the segment count."""
    model = stored.model
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    graph_inputs = {i.name: i for i in graph.input}
    row_steps = _row_steps(graph, inits, max_bytes)
    segments = plan_segments(graph, max_bytes, alone=row_steps)
    # Which segment reads each value last, so values are dropped once no later segment needs them.
    last_use: dict[str, int] = {name: len(segments) for name in outputs}
    for k, nodes in enumerate(segments):
        for node in nodes:
            step = row_steps.get(_key(node))
            for name in (step.reads() if step is not None else node.input):
                if name and name not in inits:
                    last_use[name] = max(last_use.get(name, -1), k)
    values = [dict(f) for f in feeds]
    for k, nodes in enumerate(segments):
        step = row_steps.get(_key(nodes[0]))
        if step is not None:
            _run_row_step(step, stored, inits[step.weight], values)
            for v in values:
                for name in [n for n in v if last_use.get(n, -1) <= k and n not in outputs]:
                    del v[name]
            gc.collect()
            continue
        produced = {o for node in nodes for o in node.output if o}
        needed = [n for node in nodes for n in node.input if n and n not in inits and n not in produced]
        needed = list(dict.fromkeys(needed))
        wanted = [o for node in nodes for o in node.output if o and last_use.get(o, -1) > k]
        inputs = [graph_inputs[n] if n in graph_inputs else
                  helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(values[0][n].dtype), None)
                  for n in needed]
        used = [n for n in dict.fromkeys(n for node in nodes for n in node.input) if n in inits]
        # Weights stored outside the protobuf become inputs fed from arrays read for this segment
        # only: nothing is written next to the graph, and onnxruntime uses the arrays as they are.
        external = [n for n in used if inits[n].data_location == TensorProto.EXTERNAL]
        weights = {n: stored.read(inits[n]) for n in external}
        inputs += [helper.make_tensor_value_info(n, inits[n].data_type, list(inits[n].dims)) for n in external]
        out_info = []
        for o in wanted:
            vi = onnx.ValueInfoProto()
            vi.name = o
            out_info.append(vi)
        sub = helper.make_graph(nodes, f"segment_{k}", inputs, out_info,
                                initializer=[inits[n] for n in used if n not in weights])
        sub_model = helper.make_model(sub, opset_imports=list(model.opset_import), producer_name="edge-infer")
        sub_model.ir_version = model.ir_version
        session = cpu_session(sub_model.SerializeToString(), light=True)
        del sub_model, sub
        for v in values:
            v.update(zip(wanted, session.run(wanted, {**{n: v[n] for n in needed}, **weights})))
            for name in [n for n in v if last_use.get(n, -1) <= k and n not in outputs]:
                del v[name]
        del session, weights
        gc.collect()
    return [[v[o] for o in outputs] for v in values], len(segments)


def cpu_session(model: str | bytes, light: bool = False) -> ort.InferenceSession:
    """A CPU-provider session of a graph (its path, or its serialized proto) for export's own checks.
    light: a session run a few times on little input (a segment of the float reference), where packing
    hundreds of MB of weights for faster matmuls costs more than it saves: no weight prepacking, basic
    graph optimizations. No CPU memory arena: export's checks run each graph on a few prompts of varying
    length, every position's logits, and the arena kept what the largest pass grew it to (by powers of two):
    600 MB of the 3.08 GB peak of a 1.5B export with validation (2.49 GB without it, the same speed)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.enable_cpu_mem_arena = False
    if light:
        so.add_session_config_entry("session.disable_prepacking", "1")
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
