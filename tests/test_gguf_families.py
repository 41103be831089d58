"""Every supported family from GGUF: a tiny random Hugging Face model, written as llama.cpp's
converter writes it (tests/gguf_convert.py), then
  (a) transformers' own GGUF loader reads the file back to the original model's logits: the
      test file is a faithful GGUF, independently of our reader;
  (b) `edge-infer export` of the GGUF at fp32 matches transformers' logits (prompt pass,
      decode steps with past, 32 greedy ids).
transformers' GGUF loader reads no rope scaling, soft-caps or attention scalar from the file
(llama.cpp reads them from metadata or hardcodes them per family), so (a) passes those few
config fields as overrides; the weights all come from the file.
"""

import json

import numpy as np
import pytest
import torch

import edge_infer
from edge_infer.export.export_folder import ExportOptions, export_model
from gguf_convert import write_gguf
from tiny import hf_greedy, load_reference, make_checkpoint, our_greedy

TOL = 1e-3
PROMPT = [5, 17, 42, 99, 7, 250, 31, 8, 64, 120, 3, 77]
FAMILIES = {  # kind -> config overrides of tests/tiny.py's tiny model
    "llama": {},  # Llama 3 scaling: rope_freqs.weight in the file
    "mistral": {"sliding_window": None},  # written as llama; llama.cpp has no sliding window for it
    "qwen2": {},
    "qwen3": {},
    "phi3": {},
    "gemma2": {},
    "gemma3_text": {"num_hidden_layers": 6},  # layers 0-4 sliding, layer 5 full (llama.cpp's pattern)
    "gpt2": {},  # learned positions, transposed Conv1D weights, the tied head written again as `output`
}
# Config fields transformers' GGUF loader does not read from the file.
NOT_READ = ("rope_scaling", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
            "original_max_position_embeddings", "partial_rotary_factor", "pad_token_id", "head_dim", "n_positions")


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()  # (sequence_length, vocab)


def make_family(kind: str, folder, over: dict):
    ckpt = make_checkpoint(kind, folder / "hf", **over)
    ref = load_reference(ckpt)
    path = write_gguf(kind, ref, folder / f"{kind}.gguf")
    return ref, path


def transformers_from_gguf(ref, path):
    from transformers import AutoModelForCausalLM

    overrides = {k: getattr(ref.config, k) for k in NOT_READ if getattr(ref.config, k, None) is not None}
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, torch_dtype=torch.float32,
                                                attn_implementation="eager", **overrides).eval()


def check_against(ref, model, kind: str) -> None:
    cache = model.new_cache()
    ours = model.forward(np.array([PROMPT]), cache, logits_to_keep=len(PROMPT))[0]
    expected = logits(ref, PROMPT)
    np.testing.assert_allclose(ours, expected, atol=TOL, rtol=0, err_msg=kind)
    cache = model.new_cache()
    model.forward(np.array([PROMPT[:6]]), cache)
    for t in range(6, len(PROMPT)):
        step = model.forward(np.array([[PROMPT[t]]]), cache)[0, -1]
        np.testing.assert_allclose(step, expected[t], atol=TOL, rtol=0, err_msg=f"{kind} step {t}")
    assert our_greedy(model, PROMPT, 32) == hf_greedy(ref, PROMPT, 32), kind


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_family_from_gguf(kind, tmp_path):
    ref, path = make_family(kind, tmp_path, FAMILIES[kind])
    back = transformers_from_gguf(ref, path)
    np.testing.assert_allclose(logits(back, PROMPT), logits(ref, PROMPT), atol=1e-4, rtol=0,
                               err_msg=f"{kind}: transformers reads the test GGUF back differently")
    out = export_model(path, tmp_path / "fp32", ExportOptions(quant="fp32", max_length=128))
    check_against(ref, edge_infer.load(out, device="cpu"), kind)
    validation = json.loads((out / "manifest.json").read_text())["validation"]  # the export's own check
    if kind == "llama":  # rope_freqs factors: transformers' GGUF loader cannot apply them
        assert validation["source_comparison"].startswith("skipped: transformers' GGUF loader cannot")
    else:
        assert validation["source_comparison"] == "transformers" and validation["max_abs_logit_diff"] < TOL


@pytest.mark.parametrize("kind", ["phi3", "qwen3", "gemma3_text"])
def test_int4_export_of_a_k_quant_file_computes_its_weights(kind, tmp_path):
    """Fused phi3 qkv / gate_up, qwen3 q/k norms, gemma's shifted norms: a Q4_K file (Q8_0 where rows are
    not a multiple of 256, the embedding and the head) exported to int4 computes what the fp32 export of
    the same file computes."""
    from gguf.constants import GGMLQuantizationType as QT

    folder = make_checkpoint(kind, tmp_path / "hf", hidden_size=256, intermediate_size=256)
    path = write_gguf(kind, load_reference(folder), tmp_path / "k.gguf", qtype=QT.Q4_K)
    fp32 = export_model(path, tmp_path / "fp32", ExportOptions(quant="fp32", max_length=64, validate=False))
    int4 = export_model(path, tmp_path / "int4", ExportOptions(quant="int4", max_length=64, accuracy_level=0,
                                                               validate=False, gguf_import="exact"))
    folded = export_model(path, tmp_path / "folded", ExportOptions(quant="int4", max_length=64, accuracy_level=0,
                                                                   validate=False))
    report = json.loads((int4 / "manifest.json").read_text())["quantization"]["gguf_tensors"]["tensors"]
    linear = {k: v for k, v in report.items() if k.startswith("layers.") and "norm" not in k}
    assert linear and all(v.endswith(": exact") for v in linear.values()), report
    assert report["embed.weight"] == "Q8_0: exact"
    a, b = edge_infer.load(fp32, device="cpu"), edge_infer.load(int4, device="cpu")
    ids = np.array([PROMPT])
    la = a.forward(ids, a.new_cache(), logits_to_keep=len(PROMPT))[0]
    lb = b.forward(ids, b.new_cache(), logits_to_keep=len(PROMPT))[0]
    np.testing.assert_allclose(lb, la, atol=2e-4 * np.abs(la).max(), err_msg=kind)
    # The default import rounds the block residuals (twice, at most max(d) / 450): close, not bitwise.
    f = edge_infer.load(folded, device="cpu")
    lf = f.forward(ids, f.new_cache(), logits_to_keep=len(PROMPT))[0]
    # Measured: 9e-5 (phi3), 2e-3 (qwen3: its q/k norms magnify the small differences), 1.4e-4 (gemma3).
    assert np.abs(lf - la).max() < 5e-3 * np.abs(la).max() and (lf.argmax(-1) == la.argmax(-1)).all(), kind


def test_readme_table_names_these_tests():
    """Every GGUF family and rope-variant cell of the README's table is a test that exists."""
    import re
    from pathlib import Path

    from test_rope_variants import VARIANTS

    text = Path(__file__).resolve().parents[1].joinpath("README.md").read_text(encoding="utf-8")
    section = text[text.index("### GGUF files"):]
    families = re.findall(r"test_family_from_gguf\[(\w+)\]", section)
    assert families and set(families) == set(FAMILIES)
    variants = re.findall(r"\[(hf|gguf)-(\w+)\]", section)
    assert {v for _, v in variants} == set(VARIANTS) and {r for r, _ in variants} == {"hf", "gguf"}


def test_block_sums_by_reduce_sum_equal_the_indicator_matmul(tmp_path, monkeypatch):
    """Large layer inputs sum their blocks with Reshape + ReduceSum instead of a MatMul with a 0/1 matrix
    that would not stay in cache (quantize/block_offsets.py INDICATOR_MAX_BYTES): the same logits, up to
    summation order. Here every input takes the ReduceSum branch."""
    import onnx
    from gguf.constants import GGMLQuantizationType as QT

    from edge_infer.quantize import block_offsets

    folder = make_checkpoint("qwen3", tmp_path / "hf", hidden_size=256, intermediate_size=256)
    path = write_gguf("qwen3", load_reference(folder), tmp_path / "k.gguf", qtype=QT.Q4_K)
    opts = dict(quant="int4", max_length=64, accuracy_level=0, validate=False)
    matmul = export_model(path, tmp_path / "matmul", ExportOptions(**opts))
    monkeypatch.setattr(block_offsets, "INDICATOR_MAX_BYTES", 0)
    reduce = export_model(path, tmp_path / "reduce", ExportOptions(**opts))
    graphs = {f: onnx.load(str(f / "model.onnx"), load_external_data=False).graph for f in (matmul, reduce)}
    names = {f: [n.name for n in g.node if "/block_sums/" in n.name] for f, g in graphs.items()}
    assert any(n.endswith("/block_sums/MatMul") for n in names[matmul])
    assert any(n.endswith("/block_sums/ReduceSum") for n in names[reduce])
    assert not any(n.endswith("/block_sums/MatMul") for n in names[reduce])
    assert not any(i.name.startswith("block_sums/indicator") for i in graphs[reduce].initializer)
    ids = np.array([PROMPT])
    a, b = (edge_infer.load(f, device="cpu") for f in (matmul, reduce))
    la = a.forward(ids, a.new_cache(), logits_to_keep=len(PROMPT))[0]
    lb = b.forward(ids, b.new_cache(), logits_to_keep=len(PROMPT))[0]
    np.testing.assert_allclose(lb, la, atol=1e-5 * np.abs(la).max())
