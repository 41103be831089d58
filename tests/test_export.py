"""Export: bad inputs get clear errors, folders are written atomically, manifests are verified at load."""

import json
import shutil

import numpy as np
import pytest

import edge_infer
from edge_infer.export.export_folder import ExportOptions, export_model
from edge_infer.contract.errors import ModelFileError, UserError
from edge_infer.runtime.manifest import load_manifest


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_pickle_only_checkpoint_is_refused_with_conversion_hint(tiny_checkpoints, tmp_path):
    folder = copy_checkpoint(tiny_checkpoints("llama"), tmp_path / "ckpt")
    for p in folder.glob("*.safetensors"):
        p.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ModelFileError, match="only pickle weights.*safe_serialization=True"):
        export_model(folder, tmp_path / "out", ExportOptions(quant="fp32"))
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_lists_supported(tiny_checkpoints, tmp_path):
    folder = copy_checkpoint(tiny_checkpoints("llama"), tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "mamba"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match="architecture 'mamba' is not supported; supported: llama, mistral"):
        export_model(folder, tmp_path / "out", ExportOptions(quant="fp32"))


@pytest.mark.parametrize("damage, message", [
    ("no_config", "no config.json"),
    ("bad_json", "config.json: not valid JSON"),
    ("truncated_weights", "outside the file or has the wrong size"),
    ("missing_tensor", "missing weights the architecture needs: model.layers.1.mlp.down_proj.weight"),
    ("no_tokenizer", "no tokenizer.json"),
])
def test_damaged_checkpoints(tiny_checkpoints, tmp_path, damage, message):
    folder = copy_checkpoint(tiny_checkpoints("llama"), tmp_path / "ckpt")
    weights = next(folder.glob("*.safetensors"))
    if damage == "no_config":
        (folder / "config.json").unlink()
    elif damage == "bad_json":
        (folder / "config.json").write_text("{not json")
    elif damage == "truncated_weights":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) - 1000])
    elif damage == "missing_tensor":
        from safetensors.numpy import load_file, save_file

        tensors = load_file(str(weights))
        del tensors["model.layers.1.mlp.down_proj.weight"]
        save_file(tensors, str(weights), metadata={"format": "pt"})
    elif damage == "no_tokenizer":
        (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelFileError, match=message):
        export_model(folder, tmp_path / "out", ExportOptions(quant="fp32", validate=False))
    assert not (tmp_path / "out").exists()


def test_missing_source_and_wrong_file_type(tmp_path):
    with pytest.raises(ModelFileError, match="no such file or folder"):
        export_model(tmp_path / "nope", tmp_path / "out")
    other = tmp_path / "model.bin"
    other.write_bytes(b"x")
    with pytest.raises(ModelFileError, match="expected a Hugging Face checkpoint folder or a .gguf file"):
        export_model(other, tmp_path / "out")


@pytest.mark.parametrize("options, message", [
    (ExportOptions(quant="int3"), "--quant must be one of"),
    (ExportOptions(block_size=48), "--block-size must be one of"),
    (ExportOptions(max_length=100000), "exceeds the model's context of 256"),
    (ExportOptions(quant="int4", embeddings="int8", lm_head="int4"), "lm_head"),  # gemma2 ties them
])
def test_invalid_options(tiny_checkpoints, tmp_path, options, message):
    with pytest.raises(UserError, match=message):
        export_model(tiny_checkpoints("gemma2"), tmp_path / "out", options)
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(tiny_checkpoints, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UserError, match="already exists.*--force"):
        export_model(tiny_checkpoints("llama"), out, ExportOptions(quant="fp32"))


def test_failed_export_leaves_no_folder(tiny_checkpoints, tmp_path, monkeypatch):
    """A failure after the graph is written (here: in validation) leaves nothing at the target."""
    import edge_infer.export.validate as validate

    def boom(*args, **kwargs):
        raise RuntimeError("killed mid-export")

    monkeypatch.setattr(validate, "validate_export", boom)
    with pytest.raises(RuntimeError, match="killed"):
        export_model(tiny_checkpoints("llama"), tmp_path / "out", ExportOptions(quant="int4", max_length=64))
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary sibling


def test_force_replaces_only_when_the_new_export_is_complete(tiny_checkpoints, tmp_path, monkeypatch):
    out = export_model(tiny_checkpoints("llama"), tmp_path / "out", ExportOptions(quant="fp32", max_length=64))
    import edge_infer.export.validate as validate

    monkeypatch.setattr(validate, "validate_export", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        export_model(tiny_checkpoints("llama"), out, ExportOptions(quant="int4", max_length=64, force=True))
    assert load_manifest(out).quant_scheme == "fp32"  # the old folder is intact


def test_manifest_contents(tiny_exports):
    m = load_manifest(tiny_exports("qwen3", "int4"))
    raw = m.raw
    assert raw["format"] == "edge-infer" and raw["format_version"] == 2
    assert raw["model"]["architecture"] == "qwen3" and raw["model"]["num_layers"] == 2
    assert raw["graph"]["inputs"][:2] == ["input_ids", "attention_mask"]
    assert "past_key_values.1.value" in raw["graph"]["inputs"] and "present.0.key" in raw["graph"]["outputs"]
    assert raw["quantization"]["bits"] == 4 and raw["quantization"]["block_size"] == 32
    assert raw["tokenizer"]["eos_token_ids"] == [2]
    assert 0.5 < raw["validation"]["top1_agreement"] <= 1.0
    assert set(raw["files"]) == {"model.onnx", "model.compat.onnx", "model.onnx.data", "tokenizer.json",
                                 "chat_template.jinja", "genai_config.json", "model.genai.onnx", "tokenizer_config.json"}
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in raw["files"].values())


def test_fp32_validation_against_transformers_is_stored(tiny_exports):
    v = load_manifest(tiny_exports("mistral", "fp32")).validation
    assert v["source_comparison"] == "transformers"
    assert v["max_abs_logit_diff"] < 1e-3 and v["argmax_agreement"] == 1.0


def damaged_copy(src, tmp_path):
    return shutil.copytree(src, tmp_path / "model")


@pytest.mark.parametrize("damage, message", [
    ("truncate", r"model.onnx.data: size \d+ bytes, expected \d+ \(truncated or changed\)"),
    ("flip", "model.onnx.data: sha256 does not match manifest.json"),
    ("lfs", "is a Git-LFS pointer"),
    ("delete", "tokenizer.json: missing"),
    ("version", "manifest format version 99 is not supported"),
    ("no_manifest", "no manifest.json; this is not an edge-infer model folder"),
    ("escape", "points outside the model folder"),
])
def test_load_verifies_files(tiny_exports, tmp_path, damage, message):
    folder = damaged_copy(tiny_exports("llama", "fp32"), tmp_path)
    data = folder / "model.onnx.data"
    manifest = json.loads((folder / "manifest.json").read_text())
    if damage == "truncate":
        data.write_bytes(data.read_bytes()[:-10])
    elif damage == "flip":
        raw = bytearray(data.read_bytes())
        raw[100] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif damage == "lfs":
        data.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    elif damage == "delete":
        (folder / "tokenizer.json").unlink()
    elif damage == "version":
        manifest["format_version"] = 99
    elif damage == "no_manifest":
        (folder / "manifest.json").unlink()
    elif damage == "escape":
        manifest["files"]["../../etc/passwd"] = {"sha256": "0" * 64, "size": 1}
    if damage in ("version", "escape"):
        (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFileError, match=message):
        edge_infer.load(folder, device="cpu")


def test_external_data_outside_the_folder_is_refused(tiny_exports, tmp_path):
    import onnx

    from edge_infer.contract.model_folder import write_manifest

    folder = damaged_copy(tiny_exports("llama", "fp32"), tmp_path)
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../secret.bin"
    onnx.save_model(proto, str(folder / "model.onnx"))
    body = {k: v for k, v in json.loads((folder / "manifest.json").read_text()).items()
            if k not in ("format", "format_version", "files")}
    write_manifest(folder, body)  # re-hashed, so only the path check can catch it
    with pytest.raises(ModelFileError, match="outside the model folder"):
        edge_infer.load(folder, device="cpu")


def test_fp16_export_is_skipped_by_auto_on_cpu_and_runs_when_asked(tiny_exports, cpu_only_build):
    folder = tiny_exports("llama", "fp16")
    assert load_manifest(folder).dtype == "fp16"
    with pytest.raises(UserError, match="fp16"):  # auto, where nothing but the CPU is there (a GPU would take it)
        edge_infer.load(folder, device="auto")
    model = edge_infer.load(folder, device="cpu")  # explicit: the fp16 parity checks (tests/test_gpu_profile.py)
    ref = edge_infer.load(tiny_exports("llama", "fp32"), device="cpu")
    ids = np.array([[5, 17, 42, 99, 7, 250, 31, 8]])
    a = ref.forward(ids, ref.new_cache(), logits_to_keep=8)[0]
    b = model.forward(ids, model.new_cache(), logits_to_keep=8)[0]
    assert 0 < np.abs(a - b).max() <= 0.01 * np.abs(a).max() + 0.01


def test_quantized_logits_stay_close_to_fp32(tiny_exports):
    ids = np.array([[5, 17, 42, 99, 7, 250, 31, 8]])
    ref = edge_infer.load(tiny_exports("llama", "fp32"), device="cpu")
    for quant, floor in (("int8", 0.99), ("int4", 0.9)):  # random tiny weights are hard on int4
        m = edge_infer.load(tiny_exports("llama", quant), device="cpu")
        a = ref.forward(ids, ref.new_cache(), logits_to_keep=8)[0]
        b = m.forward(ids, m.new_cache(), logits_to_keep=8)[0]
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > floor, quant
