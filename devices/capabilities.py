"""What the installed onnxruntime can load: the GroupQueryAttention inputs its schema knows.

Releases add GroupQueryAttention inputs at the end (1.24: up to head_sink; 1.31: up to
k_norm_weight; 1.32: query_seqlens), and a graph that feeds an input the installed release does
not know is refused whole (INVALID_GRAPH). A model folder holds one graph header per set of inputs
(export/graph_headers.py); `pick_header` takes the first whose inputs this onnxruntime knows,
asked of onnxruntime itself with a one-node graph (a few ms, once per input and process), so a
GPU or DirectML build of any version answers for itself.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from edge_infer.contract.errors import ModelFileError
from edge_infer.contract.graph_record import GraphHeader
from edge_infer.contract.io_names import ATTENTION_CORE_INPUTS, ATTENTION_INPUTS, POSITION_IDS, QUERY_SEQLENS

# Each input's element type as the schema constrains it (a wrong type would be refused too).
_INT32 = {"seqlens_k", "total_sequence_length", QUERY_SEQLENS}
_INT64 = {POSITION_IDS}


@functools.lru_cache(maxsize=None)
def knows_attention_input(name: str) -> bool:
    """Whether this onnxruntime's GroupQueryAttention has the input `name` (at its position)."""
    from onnx import TensorProto, helper

    from edge_infer.devices.ort import ort

    index = ATTENTION_INPUTS.index(name)
    if index < ATTENTION_CORE_INPUTS:  # in every release that has the op
        return True
    names = [""] * max(index + 1, 7)
    for i in (0, 5, 6, index):
        names[i] = ATTENTION_INPUTS[i]

    def kind(n: str) -> int:
        return TensorProto.INT32 if n in _INT32 else TensorProto.INT64 if n in _INT64 else TensorProto.FLOAT

    inputs = [helper.make_tensor_value_info(n, kind(n), None) for n in dict.fromkeys(n for n in names if n)]
    node = helper.make_node("GroupQueryAttention", names, ["out", "present_key", "present_value"],
                            domain="com.microsoft", num_heads=1, kv_num_heads=1)
    graph = helper.make_graph([node], "capability", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT,
                                                                                           None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception:  # onnxruntime's InvalidGraph: the schema has no such input
        return False
    return True


def missing_inputs(needs: Sequence[str]) -> list[str]:
    """The GroupQueryAttention inputs in `needs` this onnxruntime does not know."""
    return [n for n in needs if n not in ATTENTION_INPUTS or not knows_attention_input(n)]


def pick_header(headers: Sequence[GraphHeader], where: str) -> tuple[GraphHeader, list[str]]:
    """The first header this onnxruntime can load, and one line per header passed over (why)."""
    from edge_infer.devices.ort import ort

    skipped: list[str] = []
    for h in headers:
        lacking = missing_inputs(h.needs)
        if not lacking:
            return h, skipped
        skipped.append(f"{h.file} needs GroupQueryAttention input {', '.join(lacking)}, which onnxruntime "
                       f"{ort.__version__} does not have")
    raise ModelFileError(f"{where}: no graph of this model loads on onnxruntime {ort.__version__} ("
                         + "; ".join(skipped) + "); install a newer onnxruntime or re-export the model")


def features() -> dict[str, bool]:
    """What this onnxruntime supports of the features that need a newer release, by name."""
    return {"ragged_rows": knows_attention_input(QUERY_SEQLENS)}
