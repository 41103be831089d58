"""The gpu export profile (`export --profile gpu`): fp16 activations and KV cache, MatMulNBits with fp16
scales, fp32 logits. No GPU here: the same graph runs on the CPU provider (`--device cpu`) and is held
to the default int4 export of the same weights (same int4 codes, fp32 activations, same run) within
fp16 tolerance. Both use accuracy level 0 (float MatMulNBits compute), the gpu profile's default.

Which fp16 kernels the CPU provider has is read from the session's optimized graph: onnxruntime
inserts `InsertedPrecisionFreeCast` nodes around a node it runs in fp32 for want of an fp16 kernel.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import edge_infer
from edge_infer.devices.ort import ort
from edge_infer.export.export_folder import ExportOptions, export_model

TEXT = ("The history of the city of Paris begins in the third century BC, when a Celtic tribe called the "
        "Parisii settled on an island in the Seine. Over the following centuries")
IDS = list(range(3, 45))


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_checkpoints):
    made = {}

    def get(src, profile: str):
        key = (str(src), profile)
        if key not in made:
            out = tmp_path_factory.mktemp(f"gpu-profile-{profile}") / "model"
            made[key] = export_model(src, out, ExportOptions(quant="int4", profile=profile, accuracy_level=0,
                                                             max_length=128, validate=False))
        return made[key]

    return get


def fp32_fallbacks(graph) -> dict[str, collections.Counter]:
    """op type -> how many of its nodes the CPU provider runs as typed / in fp32 between inserted casts."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(graph.parent / "optimized.onnx")
    ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    m = onnx.load(options.optimized_model_filepath, load_external_data=False)
    casts = [n for n in m.graph.node if n.name.startswith("InsertedPrecisionFreeCast")]
    target = {c.name: next(a.i for a in c.attribute if a.name == "to") for c in casts}
    to = {c.output[0]: target[c.name] for c in casts}  # cast output -> its type
    fed = {c.input[0]: target[c.name] for c in casts}  # cast input -> the type it is cast to
    verdict: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for n in m.graph.node:
        if n not in casts:
            fp32 = any(to.get(i) == TensorProto.FLOAT for i in n.input) or \
                any(fed.get(o) == TensorProto.FLOAT16 for o in n.output)
            verdict[n.op_type]["fp32" if fp32 else "as typed"] += 1
    return verdict


def compare(reference, model, ids: list[int], steps: int = 16) -> tuple[float, float, int, int]:
    """(max |logit diff|, max |logit|, greedy steps equal, steps whose reference margin allows a verdict)
    of `model` against `reference`: every position of `ids` teacher-forced, then greedy decoding."""
    a = reference.forward(np.array([ids]), reference.new_cache(), logits_to_keep=len(ids))[0]
    b = model.forward(np.array([ids]), model.new_cache(), logits_to_keep=len(ids))[0]
    assert b.dtype == np.float32  # the logits leave the graph in fp32
    worst = float(np.abs(a - b).max())
    tol = 0.01 * float(np.abs(a).max()) + 0.01
    assert worst <= tol, f"fp16 logits {worst:.4f} off the fp32 ones (tolerance {tol:.4f})"
    assert worst > 0  # the fp16 graph really computed in fp16
    # greedy: the reference's tokens fed to both, each step's argmax compared where its margin allows
    cont = _greedy(reference, ids, steps)
    ra = reference.forward(np.array([ids + cont]), reference.new_cache(), logits_to_keep=steps)[0]
    rb = model.forward(np.array([ids + cont]), model.new_cache(), logits_to_keep=steps)[0]
    top2 = np.sort(ra, -1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * tol
    same = ra.argmax(-1) == rb.argmax(-1)
    assert same[clear].all(), f"argmax differs at a step with a clear margin: {np.nonzero(clear & ~same)}"
    decided = int(np.argmin(clear)) if not clear.all() else steps  # greedy agrees up to the first close call
    assert _greedy(model, ids, decided) == cont[:decided]
    return worst, float(np.abs(a).max()), int(same.sum()), int(clear.sum())


def _greedy(model, ids: list[int], n: int) -> list[int]:
    cache, out = model.new_cache(), []
    logits = model.forward(np.array([ids]), cache)[0, -1]
    for _ in range(n):
        out.append(int(logits.argmax()))
        logits = model.forward(np.array([[out[-1]]]), cache)[0, -1]
    return out


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_tiny_gpu_profile_matches_fp32_on_cpu(kind, exports, tiny_checkpoints):
    src = tiny_checkpoints(kind)
    gpu, ref = exports(src, "gpu"), exports(src, "default")
    model = edge_infer.load(gpu, device="cpu")
    assert model.manifest.dtype == "fp16" and model.manifest.kv_dtype == "fp16"
    assert model.new_cache().keys[0].dtype == np.float16
    worst, peak, same, clear = compare(edge_infer.load(ref, device="cpu"), model, IDS)
    print(f"{kind}: max |logit diff| {worst:.4f} (max |logit| {peak:.2f}), greedy {same}/16 equal, "
          f"{clear}/16 with a clear margin")


@pytest.mark.slow
def test_default_model_gpu_profile_matches_fp32_on_cpu(exports):
    from edge_infer.export.sources import default_model_path

    gguf = default_model_path()
    ref = edge_infer.load(exports(gguf, "default"), device="cpu")
    model = edge_infer.load(exports(gguf, "gpu"), device="cpu")
    worst, peak, same, clear = compare(ref, model, ref.tokenizer.encode(TEXT), steps=24)
    print(f"default model: max |logit diff| {worst:.4f} (max |logit| {peak:.2f}), greedy {same}/24 equal, "
          f"{clear}/24 with a clear margin")


def test_gpu_graph_runs_its_contrib_ops_in_fp16_on_cpu(exports, tiny_checkpoints):
    graph = exports(tiny_checkpoints("llama"), "gpu") / "model.onnx"
    proto = onnx.load(str(graph), load_external_data=False)
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    scales = {t.name: t.data_type for t in proto.graph.initializer}
    assert nbits and all(scales[n.input[2]] == TensorProto.FLOAT16 for n in nbits)  # fp16 scales
    verdict = fp32_fallbacks(graph)
    print({op: dict(c) for op, c in sorted(verdict.items())})
    for op in ("MatMulNBits", "GroupQueryAttention", "SkipSimplifiedLayerNormalization",
               "SimplifiedLayerNormalization"):
        assert verdict[op]["as typed"] and not verdict[op]["fp32"], (op, verdict[op])
    assert verdict["Sigmoid"]["fp32"]  # the negative control: an op the CPU has no fp16 kernel for


def test_rotary_embedding_fp16_on_cpu(tmp_path):
    """RotaryEmbedding (not in our graphs: GroupQueryAttention rotates) has an fp16 CPU kernel too."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 4, 2, 16])
    pos = helper.make_tensor_value_info("pos", TensorProto.INT64, [1, 4])
    cos = helper.make_tensor("cos", TensorProto.FLOAT16, [8, 8], np.ones(64, np.float16).tobytes(), raw=True)
    sin = helper.make_tensor("sin", TensorProto.FLOAT16, [8, 8], np.zeros(64, np.float16).tobytes(), raw=True)
    node = helper.make_node("RotaryEmbedding", ["x", "pos", "cos", "sin"], ["y"], domain="com.microsoft",
                            num_heads=2)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 4, 2, 16])
    graph = helper.make_graph([node], "rope", [x, pos], [y], initializer=[cos, sin])
    path = tmp_path / "rope.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                      helper.make_opsetid("com.microsoft", 1)]), path)
    verdict = fp32_fallbacks(path)
    assert verdict["RotaryEmbedding"] == collections.Counter({"as typed": 1})
