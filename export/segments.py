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

from edge_infer.quantize.external import read_tensor

DEFAULT_MAX_BYTES = 256 << 20


def _nbytes(t: TensorProto) -> int:
    count = int(np.prod(t.dims, dtype=np.int64)) if t.dims else 1
    return count * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def plan_segments(graph: onnx.GraphProto, max_bytes: int = DEFAULT_MAX_BYTES) -> list[list[onnx.NodeProto]]:
    """Consecutive runs of nodes whose initializers add up to at most `max_bytes` (a single node
    with more weights than that gets a segment of its own)."""
    sizes = {t.name: _nbytes(t) for t in graph.initializer}
    segments: list[list[onnx.NodeProto]] = [[]]
    held: set[str] = set()
    total = 0
    for node in graph.node:
        new = {n for n in node.input if n in sizes and n not in held}
        extra = sum(sizes[n] for n in new)
        if segments[-1] and total + extra > max_bytes:
            segments.append([])
            held, total = set(), 0
            new = {n for n in node.input if n in sizes}
            extra = sum(sizes[n] for n in new)
        segments[-1].append(node)
        held |= new
        total += extra
    return segments


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


def run_segmented(stored: StoredGraph, feeds: list[dict[str, np.ndarray]], outputs: list[str],
                  max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[list[list[np.ndarray]], int]:
    """`outputs` of the stored graph for each feed, computed segment by segment; returns (per
    feed, the output arrays in order) and the segment count."""
    model = stored.model
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    graph_inputs = {i.name: i for i in graph.input}
    segments = plan_segments(graph, max_bytes)
    # Which segment reads each value last, so values are dropped once no later segment needs them.
    last_use: dict[str, int] = {name: len(segments) for name in outputs}
    for k, nodes in enumerate(segments):
        for node in nodes:
            for name in node.input:
                if name and name not in inits:
                    last_use[name] = max(last_use.get(name, -1), k)
    values = [dict(f) for f in feeds]
    for k, nodes in enumerate(segments):
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
        session = _light_session(sub_model.SerializeToString())
        del sub_model, sub
        for v in values:
            v.update(zip(wanted, session.run(wanted, {**{n: v[n] for n in needed}, **weights})))
            for name in [n for n in v if last_use.get(n, -1) <= k and n not in outputs]:
                del v[name]
        del session, weights
        gc.collect()
    return [[v[o] for o in outputs] for v in values], len(segments)


def _light_session(model: bytes) -> ort.InferenceSession:
    """A session run a few times on little input: no weight prepacking, basic graph optimizations."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.disable_prepacking", "1")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
