"""Graph headers: more than one `.onnx` protobuf over the same `model.onnx.data`.

A header is the graph's nodes and inputs without the weights, so a second one costs a few
hundred KiB and stores no weight twice. The direct route writes two:

  * `model.onnx`, the full graph: GroupQueryAttention takes `query_seqlens` (new ids per row),
    so rows of one pass may add different numbers of ids and an idle row writes nothing.
    onnxruntime >= 1.32 knows that input; older releases refuse the whole graph.
  * `model.compat.onnx`, the same nodes for the onnxruntime releases users can install for
    accelerators today (onnxruntime-gpu 1.31, -directml 1.24, -openvino 1.24): no
    `query_seqlens` input; the graph computes it from the shape of `input_ids` (every row's
    `sequence_length` new ids), and GroupQueryAttention gets only the inputs those releases
    have. Those releases run several new tokens per row only at batch 1, so this header pads
    one-token attention only at batch 1, and the runtime runs a batched pass with one id per row
    (Model.forward_rows: wider rows run one by one).

Each header's manifest record names the GroupQueryAttention inputs it uses beyond the core ones
(`needs`); the runtime loads the first header whose needs the installed onnxruntime meets
(devices/capabilities.py). model.genai.onnx (export/genai_interop.py) is a third header, for
onnxruntime-genai.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edge_infer.contract.io_names import ATTENTION_CORE_INPUTS, ATTENTION_INPUTS, INPUT_IDS, QUERY_SEQLENS
from edge_infer.contract.graph_record import GraphHeader
from edge_infer.contract.model_folder import COMPAT_GRAPH_FILE

ATTENTION_OP = "GroupQueryAttention"


def attention_needs(graph: onnx.ModelProto) -> list[str]:
    """The optional GroupQueryAttention inputs `graph` feeds, by schema name (what a runtime must know)."""
    used: set[int] = set()
    for node in graph.graph.node:
        if node.op_type == ATTENTION_OP:
            used.update(i for i, name in enumerate(node.input) if name and i >= ATTENTION_CORE_INPUTS)
    return [ATTENTION_INPUTS[i] for i in sorted(used)]


def write_headers(folder: Path, graph_file: str) -> tuple[GraphHeader, ...]:
    """Write the compat header beside `graph_file`; returns the manifest's graph.headers, best first."""
    full = GraphHeader(graph_file, tuple(attention_needs(onnx.load(str(folder / graph_file),
                                                                   load_external_data=False))))
    return full, write_compat_header(folder, graph_file)


def query_seqlens_from_shape(graph: onnx.ModelProto, prefix: str) -> None:
    """Replace the `query_seqlens` input by nodes computing it from `input_ids`' shape: every row's
    sequence_length, (batch,). Node and constant names start with `prefix`."""
    drop_input(graph, QUERY_SEQLENS)
    consts = [numpy_helper.from_array(np.array([v], dtype=np.int64), f"{prefix}/const_{v}") for v in (0, 1, 2)]
    graph.graph.initializer.extend(consts)
    nodes = [
        helper.make_node("Shape", [INPUT_IDS], [f"{prefix}/shape"], name=f"{prefix}/Shape"),  # (2,)
        helper.make_node("Slice", [f"{prefix}/shape", f"{prefix}/const_0", f"{prefix}/const_1"],
                         [f"{prefix}/batch"], name=f"{prefix}/batch/Slice"),  # (1,)
        helper.make_node("Slice", [f"{prefix}/shape", f"{prefix}/const_1", f"{prefix}/const_2"],
                         [f"{prefix}/seq"], name=f"{prefix}/seq/Slice"),  # (1,)
        helper.make_node("Expand", [f"{prefix}/seq", f"{prefix}/batch"], [QUERY_SEQLENS],
                         name=f"{prefix}/query_seqlens/Expand"),  # (batch,)
    ]
    for n in reversed(nodes):
        graph.graph.node.insert(0, n)


def write_compat_header(folder: Path, src: str, dst: str = COMPAT_GRAPH_FILE) -> GraphHeader:
    """Write the header without `query_seqlens` beside `src`; returns its record.

    Loaded without external data: the weights stay references into the same data file."""
    graph = onnx.load(str(folder / src), load_external_data=False)
    query = ATTENTION_INPUTS.index(QUERY_SEQLENS)
    for node in graph.graph.node:
        if node.op_type == ATTENTION_OP and len(node.input) > query:
            names = list(node.input[:query])  # query_seqlens and nothing after it
            while names and not names[-1]:  # trailing unused slots: older schemas do not have them
                names.pop()
            del node.input[:]
            node.input.extend(names)
    # the one-token padding still reads query_seqlens: every row's sequence_length ids
    query_seqlens_from_shape(graph, "/compat")
    _pad_one_token_at_batch_one(graph)
    onnx.save_model(graph, str(folder / dst))
    return GraphHeader(dst, tuple(attention_needs(graph)))


PAD_FLAG = "/model/pad_one/pad"  # export/graph.py _one_token_padding: Cast(one token AND room) -> 0 or 1


def _pad_one_token_at_batch_one(graph: onnx.ModelProto) -> None:
    """Before 1.32, GroupQueryAttention refuses a pass of several rows with more than one new token
    each after a past ("batch_size must be 1 when sequence_length > 1 and past context is given"), so
    this header pads one-token attention only at batch 1; batched one-token passes run unpadded."""
    at = next((i for i, n in enumerate(graph.graph.node) if n.name == PAD_FLAG), None)
    if at is None:
        return
    cast = graph.graph.node[at]
    graph.graph.initializer.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "/compat/one"))
    nodes = [helper.make_node("Equal", ["/compat/batch", "/compat/one"], ["/compat/batch_is_one"],
                              name="/compat/batch_is_one"),
             helper.make_node("And", [cast.input[0], "/compat/batch_is_one"], ["/compat/pad_one"],
                              name="/compat/pad_one/And")]
    cast.input[0] = "/compat/pad_one"
    for n in reversed(nodes):
        graph.graph.node.insert(at, n)


def drop_input(graph: onnx.ModelProto, name: str) -> bool:
    found = [i for i in graph.graph.input if i.name == name]
    for i in found:
        graph.graph.input.remove(i)
    return bool(found)
