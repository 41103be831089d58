"""GGUF quantization types beyond Q4_0/Q4_1/Q8_0: Q2_K, Q3_K, Q5_0, Q5_1, Q5_K import exactly (as 8-bit
blocks, beside Q4_K and Q6_K); IQ4_NL / IQ4_XS are dequantized once and quantized once; the manifest
and the export output say which tensor took which path."""

import io
import json

import gguf
import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as QT

import edge_infer
from edge_infer.export.gguf_kquants import EXACT
from edge_infer.export.export_folder import ExportOptions, export_model
from edge_infer.export.progress import Progress
import test_gguf_export
from test_gguf_export import F16_FIELDS, kquant_bytes, write_llama_gguf


@pytest.fixture(autouse=True)
def own_rng(monkeypatch):
    """Our files draw from their own generator, so test_gguf_export's weights stay as they are."""
    monkeypatch.setattr(test_gguf_export, "RNG", np.random.default_rng(7))


@pytest.mark.parametrize("name", sorted(EXACT))
def test_exact_forms_equal_ggufs_dequantization(name):
    qtype = QT[name]
    raw = kquant_bytes((6, 512), qtype) if qtype in F16_FIELDS else gguf.quants.quantize(
        np.random.default_rng(0).normal(0, 1, (6, 512)).astype(np.float32), qtype)
    reference = gguf.quants.dequantize(raw, qtype).reshape(6, 512)
    decode, bits, block = EXACT[name]
    q, scales, zero_points = decode(raw.reshape(-1), 6, 512)
    assert q.max() < 2 ** bits and scales.shape == (6, 512 // block)
    ours = ((q.reshape(6, -1, block) - zero_points[..., None]) * scales[..., None]).reshape(6, 512)
    np.testing.assert_allclose(ours, reference, atol=1e-6 * np.abs(reference).max(), rtol=0)
    assert GGML_QUANT_SIZES[qtype][0] % block == 0


def run(path, tmp_path, quant, **kw):
    stream = io.StringIO()
    out = export_model(path, tmp_path / quant, ExportOptions(quant=quant, max_length=64, **kw), Progress(stream=stream))
    return out, stream.getvalue().splitlines()


def test_mixed_quant_types_import_exactly_and_are_reported(tmp_path):
    path = write_llama_gguf(tmp_path / "m.gguf", {"attn_q": QT.Q5_K, "attn_k": QT.Q5_K, "attn_v": QT.Q5_K,
                                                  "attn_output": QT.Q3_K, "ffn_gate": QT.Q5_0, "ffn_up": QT.Q5_0,
                                                  "ffn_down": QT.Q2_K, "token_embd": QT.Q5_1},
                            hidden=256, ffn=256)
    fp32, _ = run(path, tmp_path, "fp32", validate=False)
    int4, lines = run(path, tmp_path, "int4", accuracy_level=0, validate=False, embeddings="fp", lm_head="fp",
                      gguf_import="exact")  # (the default widens 8-bit blocks of 16 and 32: test_gguf_export.py)
    q = json.loads((int4 / "manifest.json").read_text())["quantization"]
    report = q["gguf_tensors"]
    assert report["tensors"]["layers.0.qkv.weight"] == "Q5_K: exact"
    assert report["tensors"]["layers.1.o.weight"] == "Q3_K: exact"
    assert report["tensors"]["layers.0.gate_up.weight"] == "Q5_0: exact"
    assert report["tensors"]["layers.0.down.weight"] == "Q2_K: dequantized once, quantized once"  # blocks of 16
    assert report["tensors"]["embed.weight"] == "Q5_1: dequantized once (float in the graph)"
    assert any("GGUF Q5_K: 2 exact" in line for line in lines)
    a, b = edge_infer.load(fp32, device="cpu"), edge_infer.load(int4, device="cpu")
    ids = np.array([[5, 17, 42, 99, 7, 250, 31, 8]])
    la = a.forward(ids, a.new_cache(), logits_to_keep=8)[0]
    lb = b.forward(ids, b.new_cache(), logits_to_keep=8)[0]
    down = run(path, tmp_path, "int8", accuracy_level=0, validate=False, embeddings="fp", lm_head="fp",
               block_size=16)[0]
    report8 = json.loads((down / "manifest.json").read_text())["quantization"]["gguf_tensors"]
    # int8 at block 16: Q2_K's blocks fit as they are, its minimums folded into the weight (two 8-bit roundings)
    assert report8["tensors"]["layers.0.down.weight"] == "Q2_K: residuals folded"
    # Only ffn_down (Q2_K) was rounded again: the rest computes the file's weights.
    c = edge_infer.load(down, device="cpu")
    lc = c.forward(ids, c.new_cache(), logits_to_keep=8)[0]
    np.testing.assert_allclose(lc, la, atol=2e-4 * np.abs(la).max())
    assert np.abs(lb - la).max() < 0.2 * np.abs(la).max()


def test_iq4_types_are_dequantized_once(tmp_path):
    path = write_llama_gguf(tmp_path / "iq.gguf", {"attn_q": QT.IQ4_NL, "attn_k": QT.IQ4_NL, "attn_v": QT.IQ4_NL,
                                                   "ffn_down": QT.IQ4_XS, "token_embd": QT.Q8_0},
                            hidden=256, ffn=256)
    out, lines = run(path, tmp_path, "int4", validate=False)
    report = json.loads((out / "manifest.json").read_text())["quantization"]["gguf_tensors"]
    assert report["tensors"]["layers.0.qkv.weight"] == "IQ4_NL: dequantized once, quantized once"
    assert report["tensors"]["layers.0.down.weight"] == "IQ4_XS: dequantized once, quantized once"
    assert report["tensors"]["embed.weight"] == "Q8_0: exact"
    assert any(line.strip().startswith("GGUF IQ4_NL: 2 dequantized once, quantized once") for line in lines)
