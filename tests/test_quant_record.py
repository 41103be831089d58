"""The manifest's quantization record is one type from the CLI to the runtime (contract/quantization.py),
and it reads the records of folders written before the type existed."""

import json

import pytest

from edge_infer.contract.quantization import QuantRecord, QuantSettings
from edge_infer.quantize.config import QuantConfig

# As export/pipeline.py wrote it before the typed record (an int4 GGUF export).
OLD_EXPORT = {
    "scheme": "int4", "bits": 4, "block_size": 32, "symmetric": False, "accuracy_level": 4, "embeddings": "int8",
    "lm_head": "int8", "exclude": [], "method": "search", "summary": {"MatMulNBits": 210, "requantized": []},
    "gguf_import": "exact", "gguf_q4_1": "7 Q4_1/Q4_K weights imported exactly (integer zero point + block residual)",
    "source_blocks": "210 weights kept their source quantization where bits and block size matched",
}
# As export/npu_export.py wrote it (DequantizeLinear blocks: no accuracy level, no rounding method).
OLD_NPU = {"scheme": "int8", "bits": 8, "block_size": 32, "symmetric": True, "format": "DequantizeLinear ...",
           "quantized_weights": 211, "lm_head": "int8 blocks", "embeddings": "fp32 (Gather)"}


def test_a_quant_config_is_the_recorded_settings():
    config = QuantConfig.from_options("int4", block_size=16, symmetric=True, accuracy_level=0, rounding="rtn")
    assert isinstance(config, QuantSettings)
    record = QuantRecord("int4", config, {"summary": {}})
    back = QuantRecord.from_manifest(json.loads(json.dumps(record.to_manifest())), "fp32")
    assert back.settings == QuantSettings(bits=4, block_size=16, symmetric=True, accuracy_level=0, method="rtn",
                                          lm_head="auto")  # decided per model by for_vocab; recorded as given here
    decided = QuantRecord("int4", config.for_vocab(151936, tied=True)).to_manifest()
    assert decided["lm_head"] == "rescore"
    assert back.bits == 4 and not back.int8_activations and back.details == {"summary": {}}


def test_records_of_earlier_exports_read_typed_and_write_back_the_same():
    for raw in (OLD_EXPORT, OLD_NPU):
        record = QuantRecord.from_manifest(raw, "fp32")
        assert record.scheme == raw["scheme"] and record.bits == raw["bits"]
        assert record.to_manifest() == raw  # the same keys and values
    assert list(QuantRecord.from_manifest(OLD_EXPORT, "fp32").to_manifest()) == list(OLD_EXPORT)  # and order
    npu = QuantRecord.from_manifest(OLD_NPU, "fp32")
    assert npu.settings is not None and npu.settings.accuracy_level is None and npu.int8_activations
    assert npu.describe() == "int8 (block 32, sym, embeddings fp32 (Gather), lm_head int8 blocks)"


def test_float_records():
    assert QuantRecord.from_manifest({"scheme": "fp16"}, "fp16") == QuantRecord("fp16")
    assert QuantRecord.from_manifest({}, "fp32").scheme == "fp32"  # no section: the graph's dtype
    assert QuantRecord("fp32").to_manifest() == {"scheme": "fp32"}
    assert QuantRecord("fp32").bits is None and QuantRecord("fp32").describe() == "fp32"


def test_details_never_overwrite_the_settings():
    with pytest.raises(AssertionError, match="bits"):
        QuantRecord("int4", QuantConfig(bits=4), {"bits": 8}).to_manifest()


def test_only_int8_and_int4_are_quantization_schemes():
    from edge_infer.contract.errors import UserError

    with pytest.raises(UserError, match="int8 or int4"):
        QuantConfig.from_options("fp16")
