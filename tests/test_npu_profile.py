"""The npu export profile on the CPU provider: standard ops only, static shapes, same greedy ids
as the default fp32 export, and the static plan driven through generate/stream_generate."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from edge_infer.contract.errors import ContextLengthError, UserError
from tiny import our_greedy

import edge_infer

IDS = list(range(3, 45))  # 42 prompt tokens: two full chunks of 16 and a left-padded one of 10


@pytest.fixture(scope="module")
def npu_exports(tmp_path_factory, tiny_checkpoints):
    from edge_infer.export.export_folder import ExportOptions, export_model

    made = {}

    def get(kind: str, quant: str = "fp32"):
        if (kind, quant) not in made:
            out = tmp_path_factory.mktemp(f"npu-{kind}-{quant}") / "model"
            made[kind, quant] = export_model(tiny_checkpoints(kind), out, ExportOptions(
                quant=quant, max_length=128, profile="npu", chunk=16))
        return made[kind, quant]

    return get


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_npu_fp32_greedy_equals_default_fp32_export(kind, npu_exports, tiny_exports):
    folder = npu_exports(kind)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["graph"]["profile"] == "npu" and manifest["graph"]["kv_layout"] == "static"
    assert manifest["validation"]["max_abs_logit_diff"] < 1e-3  # every position through the decode graph
    assert manifest["validation"]["max_abs_logit_diff_prefill_last"] < 1e-3
    npu = edge_infer.load(folder, device="cpu")
    ref = edge_infer.load(tiny_exports(kind, "fp32"), device="cpu")
    assert our_greedy(npu, IDS, 24) == our_greedy(ref, IDS, 24)


def test_graphs_are_standard_ops_static_and_share_one_weights_file(npu_exports):
    folder = npu_exports("llama", "int4")
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["chat_template.jinja", "decode.onnx", "manifest.json", "model.onnx.data", "prefill.onnx",
                     "tokenizer.json"]
    for name, seq in (("prefill.onnx", 16), ("decode.onnx", 1)):
        m = onnx.load(str(folder / name), load_external_data=False)
        assert {o.domain for o in m.opset_import} == {""}  # no com.microsoft
        assert all(n.domain in ("", "ai.onnx") for n in m.graph.node)
        assert "DequantizeLinear" in {n.op_type for n in m.graph.node}
        for v in list(m.graph.input) + list(m.graph.output):  # every dimension fixed
            assert all(d.HasField("dim_value") for d in v.type.tensor_type.shape.dim), v.name
        ids = next(i for i in m.graph.input if i.name == "input_ids")
        assert ids.type.tensor_type.shape.dim[1].dim_value == seq
        external = {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
        assert external == {"model.onnx.data"}
    assert (folder / "decode.onnx").stat().st_size < 2 << 20  # weights live only in the data file


def test_quantized_profile_kl_beside_the_default_int4(npu_exports, tiny_exports):
    """Both KLs are against the same reference (the default fp32 graph of the same weights)."""
    npu4 = json.loads((npu_exports("llama", "int4") / "manifest.json").read_text())["validation"]
    npu8 = json.loads((npu_exports("llama", "int8") / "manifest.json").read_text())["validation"]
    default4 = json.loads((tiny_exports("llama", "int4") / "manifest.json").read_text())["validation"]
    print(f"KL vs fp32: npu int4 {npu4['mean_kl']:.4f}, npu int8 {npu8['mean_kl']:.5f}, "
          f"default int4 {default4['mean_kl']:.4f}")
    assert npu8["mean_kl"] < 0.01 and npu8["top1_agreement"] > 0.8  # tiny random logits are near ties
    assert npu4["mean_kl"] < 1.5 * default4["mean_kl"]  # the same searched asymmetric rounding


def test_generate_and_stream_on_static_plan(npu_exports, tiny_exports):
    npu = edge_infer.load(npu_exports("qwen2"), device="cpu")
    ref = edge_infer.load(tiny_exports("qwen2", "fp32"), device="cpu")
    prompt = "The quick brown fox jumps over the lazy dog. Paris is the capital of"
    a = edge_infer.generate(npu, prompt, max_tokens=20, temperature=0)
    assert a == edge_infer.generate(ref, prompt, max_tokens=20, temperature=0)
    assert "".join(c.text for c in edge_infer.stream_generate(npu, prompt, max_tokens=20, temperature=0)) == a
    # A reused cache (prefix reuse trims it) gives the same answer.
    cache = npu.new_cache()
    edge_infer.generate(npu, prompt, max_tokens=5, temperature=0, cache=cache)
    assert edge_infer.generate(npu, prompt, max_tokens=20, temperature=0, cache=cache) == a


def test_several_kept_logits_equal_single_steps(npu_exports):
    npu = edge_infer.load(npu_exports("llama"), device="cpu")
    c1, c2 = npu.new_cache(), npu.new_cache()
    rows = npu.forward(np.array([IDS]), c1, logits_to_keep=4)[0]  # (4, vocab)
    npu.forward(np.array([IDS[:-3]]), c2)
    singles = [npu.forward(np.array([[t]]), c2)[0, -1] for t in IDS[-3:]]
    assert rows.shape[0] == 4 and np.abs(rows[1:] - np.stack(singles)).max() < 1e-4


def test_static_plan_refusals(npu_exports, tiny_checkpoints, tmp_path):
    from edge_infer.export.export_folder import ExportOptions, export_model

    npu = edge_infer.load(npu_exports("llama"), device="cpu")
    with pytest.raises(UserError, match="batch 1"):
        npu.new_cache(batch=2)
    with pytest.raises(UserError, match="fixed cache"):
        npu.new_cache(max_length=256)
    short = npu.new_cache(max_length=50)
    assert short.max_length == 50 and short.keys[0].shape[2] == 128
    with pytest.raises(ContextLengthError):
        npu.forward(np.array([IDS + IDS]), short)
    with pytest.raises(UserError, match="sliding-window"):  # mistral window 7 < max_length
        export_model(tiny_checkpoints("mistral"), tmp_path / "m", ExportOptions(quant="fp32", max_length=64,
                                                                                 profile="npu"))
    assert not (tmp_path / "m").exists()
    from edge_infer.export.quantize_exported import quantize_folder
    from edge_infer.quantize.config import QuantConfig

    with pytest.raises(UserError, match="npu-profile export"):
        quantize_folder(npu_exports("llama"), tmp_path / "q", QuantConfig(bits=4))
    with pytest.raises(UserError, match="--quant fp16"):
        export_model(tiny_checkpoints("llama"), tmp_path / "f", ExportOptions(quant="fp16", max_length=64,
                                                                              profile="npu"))


def test_qnn_refuses_dynamic_graphs_and_device_options():
    from edge_infer.devices import ModelTraits, resolve

    have = ["QNNExecutionProvider", "OpenVINOExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(UserError, match="--profile npu"):
        resolve("qnn", have, ModelTraits(contrib_ops=False))
    with pytest.raises(UserError, match="standard ONNX ops only"):
        resolve("openvino", have, ModelTraits(contrib_ops=True))
    plan = resolve("openvino:npu", have, ModelTraits(contrib_ops=False, static_shapes=True))
    assert plan.provider_options[0]["device_type"] == "NPU"
    with pytest.raises(UserError, match="openvino:CPU"):
        resolve("openvino:tpu", have, ModelTraits(contrib_ops=False, static_shapes=True))
    auto = resolve("auto", have, ModelTraits(contrib_ops=True))
    assert auto.device == "cpu" and any(r.startswith("qnn: skipped") for r in auto.reasons)
