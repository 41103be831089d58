"""Architectures without a direct builder go through optimum-onnx (the export extra), and still run."""

import numpy as np
import pytest
import torch

import edge_infer
from edge_infer.export.export_folder import ExportOptions, export_model
from edge_infer.runtime.manifest import load_manifest
from tiny import hf_greedy, load_reference, make_checkpoint, our_greedy

pytest.importorskip("optimum.exporters.onnx")
IDS = [5, 17, 42, 99, 7, 250, 31, 8, 64, 120, 3, 77]


@pytest.fixture(scope="module")
def stablelm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stablelm")
    return make_checkpoint("stablelm", folder / "ckpt")


def test_optimum_route_fp32_parity(stablelm, tmp_path):
    out = export_model(stablelm, tmp_path / "m", ExportOptions(quant="fp32", max_length=128))
    manifest = load_manifest(out)
    assert manifest.raw["graph"]["route"] == "optimum" and manifest.kv_layout == "concat"
    assert manifest.validation["max_abs_logit_diff"] < 1e-3
    ref, model = load_reference(stablelm), edge_infer.load(out, device="cpu")
    with torch.no_grad():
        expected = ref(torch.tensor([IDS])).logits[0].numpy()
    cache = model.new_cache()
    prompt = model.forward(np.array([IDS[:6]]), cache, logits_to_keep=6)[0]
    np.testing.assert_allclose(prompt, expected[:6], atol=1e-3, rtol=0)
    for t in range(6, len(IDS)):  # decode steps with past
        step = model.forward(np.array([[IDS[t]]]), cache)[0, -1]
        np.testing.assert_allclose(step, expected[t], atol=1e-3, rtol=0)
    cache.trim(8)  # rollback then refill equals the uncached pass
    again = model.forward(np.array([IDS[8:]]), cache, logits_to_keep=4)[0]
    np.testing.assert_allclose(again, expected[8:], atol=1e-3, rtol=0)
    assert our_greedy(model, IDS, 32) == hf_greedy(ref, IDS, 32)


def test_optimum_route_int8_generates(stablelm, tmp_path):
    out = export_model(stablelm, tmp_path / "q", ExportOptions(quant="int8", max_length=128))
    m = edge_infer.load(out, device="cpu")
    assert m.manifest.quant_scheme == "int8" and m.manifest.validation["top1_agreement"] > 0.8
    chunks = list(edge_infer.stream_generate(m, [{"role": "user", "content": "hi"}], max_tokens=5))
    assert chunks[-1].finish_reason is not None
