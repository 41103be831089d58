"""Issue 10, model folders: the manifest has a schema checked before anything is allocated, the KV
cache it asks for is held against the machine's memory, and `inspect` applies `run`'s file checks."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

import edge_infer
from edge_infer.cli import main
from edge_infer.runtime import manifest_schema
from edge_infer.contract.errors import ModelFileError
from edge_infer.contract.model_folder import MANIFEST, file_entry
from edge_infer.runtime.manifest import load_manifest


@pytest.fixture(scope="module")
def source(tiny_exports) -> Path:
    return tiny_exports("llama", "fp32")


def copy(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


def edit(folder: Path, change) -> Path:
    doc = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    change(doc)
    (folder / MANIFEST).write_text(json.dumps(doc), encoding="utf-8")
    return folder


def setter(section: str, key: str, value):
    def change(doc):
        doc[section][key] = value
    return change


def first_file(doc):
    name = next(iter(doc["files"]))
    doc["files"][name] = "deadbeef"


CASES = {  # case -> (manifest change, words of the one-line error)
    "num_layers + 1": (lambda d: d["model"].update(num_layers=d["model"]["num_layers"] + 1),
                       "but model.num_layers is"),
    "head_dim 1.5": (setter("model", "head_dim", 1.5), "model.head_dim is 1.5, expected an integer"),
    "max_length 10**12": (setter("model", "max_length", 10**12), "model.max_length is 1000000000000"),
    "files entry a string": (first_file, "expected {\"sha256\""),
    "vocab_size 0": (setter("model", "vocab_size", 0), "model.vocab_size is 0"),
    "bos_token_id 'x'": (setter("tokenizer", "bos_token_id", "x"), "tokenizer.bos_token_id is 'x'"),
    "eos id past vocab": (setter("tokenizer", "eos_token_ids", [10**6]), "tokenizer.eos_token_ids is [1000000]"),
    "max_new_tokens 'lots'": (setter("generation", "max_new_tokens", "lots"), "generation.max_new_tokens is 'lots'"),
    "temperature 'hot'": (lambda d: d["generation"].update(source_defaults={"temperature": "hot"}),
                          "generation.source_defaults.temperature"),
    "num_heads 5": (setter("model", "num_heads", 5), "not a multiple of model.num_kv_heads"),
    "dtype int3": (setter("graph", "dtype", "int3"), "graph.dtype is 'int3', expected one of fp32, fp16"),
    "model is a list": (lambda d: d.update(model=[1]), "model is [1], expected an object"),
    "inputs not strings": (setter("graph", "inputs", [1, 2]), "graph.inputs must be a list"),
    "num_layers true": (setter("model", "num_layers", True), "model.num_layers is True"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_manifest_is_one_line_exit_2(source, tmp_path, case):
    folder = edit(copy(source, tmp_path / "m"), CASES[case][0])
    with pytest.raises(ModelFileError) as e:
        load_manifest(folder)
    assert CASES[case][1] in str(e.value) and "\n" not in str(e.value), str(e.value)
    r = CliRunner().invoke(main, ["run", str(folder), "hi", "--max-tokens", "2"], catch_exceptions=False)
    assert r.exit_code == 2 and CASES[case][1] in r.output and "Traceback" not in r.output, r.output


def test_manifest_consistent_with_itself_but_not_the_graph(source, tmp_path):
    def one_layer_fewer(doc):
        n = doc["model"]["num_layers"] - 1
        doc["model"]["num_layers"] = n
        for kind, prefix in (("inputs", "past_key_values"), ("outputs", "present")):
            doc["graph"][kind] = [x for x in doc["graph"][kind] if not x.startswith(f"{prefix}.{n}.")]
    folder = edit(copy(source, tmp_path / "fewer"), one_layer_fewer)
    with pytest.raises(ModelFileError, match="the graph has 2 layers of past_key_values, but the manifest says"):
        edge_infer.load(folder, device="cpu", threads=1)
    folder = edit(copy(source, tmp_path / "dim"), setter("model", "head_dim", 8))
    with pytest.raises(ModelFileError, match=r"has shape \[.*\], but the manifest says \(batch, 2, sequence, 8\)"):
        edge_infer.load(folder, device="cpu", threads=1)


def test_kv_cache_larger_than_memory_is_refused_before_allocating(source, tmp_path, monkeypatch):
    m = edge_infer.load(source, device="cpu", threads=1)
    need = m.manifest.kv_bytes()
    monkeypatch.setattr(manifest_schema, "available_memory", lambda: need - 1)
    with pytest.raises(ModelFileError, match=r"needs .* of KV cache, but this machine has .* available"):
        edge_infer.load(source, device="cpu", threads=1)
    with pytest.raises(ModelFileError, match="a KV cache of 8 x"):
        m.new_cache(batch=8)
    monkeypatch.setattr(manifest_schema, "available_memory", lambda: need + 1)
    assert m.new_cache(batch=1).max_length == m.max_length


def test_real_available_memory_is_read():
    avail = manifest_schema.available_memory()
    assert avail is not None and 1 << 20 < avail < 1 << 50


def test_typed_generation_defaults(source):
    m = load_manifest(source)
    assert m.generation.max_new_tokens == 256 and isinstance(m.generation.source_defaults, dict)


# -- inspect applies run's file checks -------------------------------------------------------

def point_external_data(folder: Path, location: str) -> Path:
    graph = folder / "model.onnx"
    proto = onnx.load(str(graph), load_external_data=False)
    t = next(t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    for e in t.external_data:
        if e.key == "location":
            e.value = location
    onnx.save(proto, str(graph))
    return edit(folder, lambda d: d["files"].update({"model.onnx": file_entry(graph)}))


@pytest.mark.parametrize("how, words", [
    ("absolute", "outside the model folder"), ("dotdot", "outside the model folder"),
    ("hardlink", "is a hard link"), ("symlink", "link out of the model folder"),
])
def test_inspect_refuses_what_run_refuses(source, tmp_path, how, words):
    folder = copy(source, tmp_path / "m")
    data = folder / "model.onnx.data"
    if how == "absolute":
        point_external_data(folder, "/etc/passwd")
    elif how == "dotdot":
        point_external_data(folder, "../model.onnx.data")
    elif how == "hardlink":
        outside = tmp_path / "outside.data"
        shutil.copy(data, outside)
        data.unlink()
        os.link(outside, data)
    else:
        outside = tmp_path / "outside.data"
        shutil.move(data, outside)
        data.symlink_to(outside)
    for args in (["inspect", str(folder)], ["inspect", str(folder), "--no-verify"],
                 ["run", str(folder), "hi", "--max-tokens", "1"]):
        r = CliRunner().invoke(main, args, catch_exceptions=False)
        assert r.exit_code == 2 and words in r.output and "Traceback" not in r.output, (args, r.output)
