"""The manifest's graph record is one type from export to the runtime (contract/graph_record.py),
and it reads the records of folders written before the type existed."""

import json

import pytest

from edge_infer.contract.graph_record import GraphRecord, kv_cache_bytes

IO = {"inputs": ["input_ids", "attention_mask", "past_key_values.0.key", "past_key_values.0.value"],
      "outputs": ["logits", "present.0.key", "present.0.value"]}
# As export_model patched it in before the typed record (direct route, int8 KV cache).
OLD_DIRECT = {"file": "model.onnx", "data_file": "model.onnx.data", **IO, "dtype": "fp32",
              "kv_cache": "one buffer of max_length per layer, shared by past and present, int8 with per-channel scales",
              "ops": "com.microsoft GroupQueryAttention, SkipSimplifiedLayerNormalization, MatMulNBits",
              "route": "direct", "kv_layout": "shared", "attention_padding": "in-graph",
              "genai": "not written: onnxruntime-genai does not read a quantized KV cache"}
# As npu_export's .update() wrote it.
OLD_NPU = {"file": "decode.onnx", "data_file": "model.onnx.data", **IO, "dtype": "fp32",
           "kv_cache": "one fixed buffer of 64 positions per layer", "ops": "standard ONNX only (opset 21)",
           "route": "direct", "kv_layout": "static", "profile": "npu", "target": "npu: OpenVINO",
           "static_plan": {"max_length": 64, "prefill": {"file": "prefill.onnx", "sequence_length": 8},
                           "decode": {"file": "decode.onnx", "sequence_length": 1}}}
# Before kv_layout and route were written, with a key this edge-infer does not know.
OLDEST = {"file": "model.onnx", **IO, "dtype": "fp16", "someday": {"a": 1}}


def test_records_of_earlier_exports_read_typed_and_write_back_the_same():
    for raw in (OLD_DIRECT, OLD_NPU, OLDEST):
        record = GraphRecord.from_manifest(json.loads(json.dumps(raw)))
        assert record.inputs == tuple(IO["inputs"]) and record.outputs == tuple(IO["outputs"])
        assert record.to_manifest() == raw
    assert GraphRecord.from_manifest(OLD_NPU).static_plan["prefill"]["sequence_length"] == 8
    oldest = GraphRecord.from_manifest(OLDEST)
    assert oldest.kv_layout is None and oldest.route is None and oldest.extra == {"someday": {"a": 1}}


def test_extra_keys_never_overwrite_the_fields():
    with pytest.raises(AssertionError, match="route"):
        GraphRecord("model.onnx", (), (), route="direct", extra={"route": "optimum"}).to_manifest()


def test_exported_folder_reads_back_as_the_record_export_built(tiny_exports):
    from edge_infer.runtime.manifest import load_manifest

    m = load_manifest(tiny_exports("llama", "fp32"))
    assert m.graph == GraphRecord.from_manifest(m.raw["graph"]) and m.graph.to_manifest() == m.raw["graph"]
    assert m.graph.route == "direct" and m.kv_layout == "shared" and m.graph.attention_padding == "in-graph"
    assert m.inputs == tuple(m.raw["graph"]["inputs"]) and m.graph_file == "model.onnx" and m.dtype == "fp32"


@pytest.mark.parametrize("kind,itemsize,per", [("fp32", 4, 1), ("fp16", 2, 1), ("int8", 1, 1), ("int4", 1, 0.5)])
def test_kv_cache_bytes(kind, itemsize, per):
    # keys and values, 3 layers, 2 rows, 4 kv heads, 16 positions, head_dim 8
    assert kv_cache_bytes(kind, 3, 4, 8, 16, batch=2) == int(2 * 3 * 2 * 4 * 16 * 8 * per * itemsize)
