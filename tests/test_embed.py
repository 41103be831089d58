"""Embeddings (issue 23): encoder exports and decoders exported with --task embed, against transformers.

The reference is transformers' last_hidden_state of each text alone, pooled and normalized as the
folder's sentence-transformers files say (tests/tiny_encoders.py), computed in the same run.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tiny_encoders import ENCODERS, OPTIMUM_ENCODERS, make_encoder_checkpoint, reference_embeddings, write_pooling

TEXTS = ["The quick brown fox jumps over the lazy dog.", "x", "Paris is the capital of France. Numbers 0123456789.",
         "Tabs and  double  spaces, more than one sliding window of tokens. " * 2]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """(kind, quant) -> (source folder, exported folder), each built once."""
    from tiny import make_checkpoint

    from edge_infer.export.export_folder import ExportOptions, export_model

    sources: dict = {}
    made: dict = {}

    def get(kind: str, quant: str = "fp32"):
        if kind not in sources:
            root = tmp_path_factory.mktemp(f"embed-src-{kind}")
            if kind in ENCODERS + OPTIMUM_ENCODERS:
                sources[kind] = make_encoder_checkpoint(kind, root / "src")
            else:
                sources[kind] = make_checkpoint(kind, root / "src")
                if kind == "qwen3":  # Qwen3-Embedding's pipeline; the llama source keeps the decoder default
                    write_pooling(sources[kind], "pooling_mode_lasttoken", True)
                    (sources[kind] / "config_sentence_transformers.json").write_text(json.dumps(
                        {"prompts": {"query": "Instruct: find the passage\nQuery:", "document": ""}}))
        if (kind, quant) not in made:
            out = tmp_path_factory.mktemp(f"embed-{kind}-{quant}") / "model"
            made[kind, quant] = export_model(sources[kind], out, ExportOptions(quant=quant, task="embed",
                                                                               max_length=128))
        return sources[kind], made[kind, quant]

    return get


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("kind", [*ENCODERS, *OPTIMUM_ENCODERS, "qwen3", "llama"])
def test_parity_with_transformers(exports, kind):
    from edge_infer.runtime.embed import load_embedding

    src, folder = exports(kind)
    model = load_embedding(folder)
    want = {"bert": "mean", "xlm-roberta": "cls", "modernbert": "mean", "qwen3": "last_token", "llama": "last_token",
            "mpnet": "mean", "distilbert": "cls"}
    assert model.record.pooling == want[kind]
    assert model.raw["graph"]["route"] == ("optimum" if kind in OPTIMUM_ENCODERS else "direct")
    ids = model.tokenize(TEXTS)
    if kind == "modernbert":
        assert max(map(len, ids)) > 8  # longer than the sliding window: the local layers' mask matters
    ours = model.embed(TEXTS)
    ref = reference_embeddings(src, ids, model.record.pooling, model.record.normalize)
    assert ours.dtype == np.float32 and ours.shape == (len(TEXTS), model.dimensions)
    assert _cosines(ours, ref).min() >= 0.9999
    scale = np.linalg.norm(ref, axis=1, keepdims=True)
    assert np.abs(ours - ref).max() / scale.min() < 1e-4  # magnitudes too (xlm-roberta's CLS is not normalized)
    if model.record.normalize:
        np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("kind", [*ENCODERS, "mpnet", "qwen3"])
def test_int8_close_to_fp32_and_batch_invariant(exports, kind):
    from edge_infer.runtime.embed import load_embedding

    fp32 = load_embedding(exports(kind)[1]).embed(TEXTS)
    model = load_embedding(exports(kind, "int8")[1])
    assert model.raw["quantization"]["scheme"] != "fp32"
    ours = model.embed(TEXTS)
    cos = _cosines(ours, fp32)
    print(f"{kind} int8 vs fp32 cosine: min {cos.min():.6f}")
    assert cos.min() >= 0.99
    solo = np.stack([model.embed([t])[0] for t in TEXTS])  # different lengths batched == one at a time
    np.testing.assert_allclose(ours, solo, rtol=0, atol=1e-5)
    shuffled = model.embed(TEXTS[::-1])[::-1]
    np.testing.assert_allclose(ours, shuffled, rtol=0, atol=1e-5)


def test_token_ids_and_usage(exports):
    from edge_infer.runtime.embed import load_embedding

    model = load_embedding(exports("bert")[1])
    ids = model.tokenize(TEXTS)
    result = model.embed_ids(ids)
    np.testing.assert_array_equal(result.vectors, model.embed(TEXTS))
    assert result.prompt_tokens == sum(map(len, ids))


def test_public_api(exports):
    import edge_infer

    folder = exports("bert")[1]
    one = edge_infer.embed(folder, "just one text")
    assert one.shape == (1, 64) and one.dtype == np.float32
    np.testing.assert_array_equal(edge_infer.embed(str(folder), ["just one text"]), one)


def test_bad_input_is_a_clear_error(exports):
    from edge_infer.contract.errors import ContextLengthError, UserError
    from edge_infer.runtime.embed import load_embedding

    model = load_embedding(exports("bert")[1])
    with pytest.raises(UserError, match="no input"):
        model.embed([])
    with pytest.raises(UserError, match="input 1 is an empty string"):
        model.embed(["fine", ""])
    with pytest.raises(ContextLengthError, match="takes at most 128"):
        model.embed(["word " * 400])
    with pytest.raises(UserError, match="outside model"):
        model.embed_ids([[1, 99999]])
    with pytest.raises(UserError, match="not trained to be shortened"):
        model.embed(["text"], dimensions=32)


def test_generation_and_embedding_folders_refuse_each_other(exports, tiny_exports):
    import edge_infer
    from edge_infer.contract.errors import UserError
    from edge_infer.runtime.embed import load_embedding

    chat = tiny_exports("llama", "int8")
    with pytest.raises(UserError, match=r"text-generation model \(llama\).*--task embed"):
        load_embedding(chat)
    with pytest.raises(UserError, match="is an embedding model.*edge_infer.embed"):
        edge_infer.load(exports("bert")[1])


def test_matryoshka_truncates_and_renormalizes(exports, tmp_path):
    from edge_infer.export.export_folder import ExportOptions, export_model
    from edge_infer.runtime.embed import load_embedding

    src = exports("bert")[0]
    out = export_model(src, tmp_path / "m", ExportOptions(quant="fp32", matryoshka=True))
    model = load_embedding(out)
    full, short = model.embed(TEXTS), model.embed(TEXTS, dimensions=16)
    want = full[:, :16] / np.linalg.norm(full[:, :16], axis=1, keepdims=True)
    np.testing.assert_allclose(short, want, atol=1e-6)
    with pytest.raises(Exception, match="from 1 to 64"):
        model.embed(TEXTS, dimensions=65)


def test_export_refusals(exports, tmp_path):
    from edge_infer.contract.errors import ModelFileError, UserError
    from edge_infer.export.export_folder import ExportOptions, export_model

    src = tmp_path / "src"
    shutil.copytree(exports("bert")[0], src)
    with pytest.raises(UserError, match="encoder model.*--task embed"):
        export_model(src, tmp_path / "a", ExportOptions(quant="fp32", task="generate"))
    modules = json.loads((src / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (src / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelFileError, match="module 'Dense' is not supported"):
        export_model(src, tmp_path / "b", ExportOptions(quant="fp32"))
    assert not (tmp_path / "b").exists()


def test_store_name(exports, tmp_path, monkeypatch):
    import edge_infer
    from edge_infer.contract.model_store import folder_of, parse_name
    from edge_infer.export.store.catalog import entry

    monkeypatch.setenv("EDGE_INFER_HOME", str(tmp_path / "home"))
    folder = exports("bert")[1]
    shutil.copytree(folder, folder_of("mini-embed"))
    np.testing.assert_array_equal(edge_infer.embed("mini-embed", TEXTS), edge_infer.embed(folder, TEXTS))
    listed = entry(parse_name("mini-embed"))
    assert listed.problem is None and listed.architecture == "bert" and listed.kv_bytes == 0  # no cache kept


def test_nomic_bert_against_its_forward_pass(tmp_path):
    """NomicBERT (no transformers class: tests/tiny_encoders.py writes the checkpoint and its reference)."""
    from tiny_encoders import make_nomic_checkpoint, nomic_reference

    from edge_infer.export.export_folder import ExportOptions, export_model
    from edge_infer.runtime.embed import load_embedding

    src = make_nomic_checkpoint(tmp_path / "src")
    fp32 = load_embedding(export_model(src, tmp_path / "fp32", ExportOptions(quant="fp32")))
    ours, ref = fp32.embed(TEXTS), nomic_reference(src, fp32.tokenize(TEXTS))
    assert _cosines(ours, ref).min() >= 0.9999
    int8 = load_embedding(export_model(src, tmp_path / "int8", ExportOptions(quant="int8"))).embed(TEXTS)
    cos = _cosines(int8, ours)
    print(f"nomic_bert int8 vs fp32 cosine: min {cos.min():.6f}")
    assert cos.min() >= 0.99


def test_named_prompts(exports):
    from edge_infer.contract.errors import UserError
    from edge_infer.runtime.embed import load_embedding

    model = load_embedding(exports("qwen3")[1])
    prefix = "Instruct: find the passage\nQuery:"
    np.testing.assert_array_equal(model.embed(TEXTS[:2], prompt_name="query"), model.embed([prefix + t for t in TEXTS[:2]]))
    with pytest.raises(UserError, match="no prompt named 'passage'.*document, query"):
        model.embed(TEXTS[:1], prompt_name="passage")


def test_auto_task_routes_encoders_to_embedding(exports):
    from edge_infer.export.embed_export import source_is_encoder

    assert source_is_encoder(exports("bert")[0]) and source_is_encoder(exports("distilbert")[0])
    assert not source_is_encoder(exports("qwen3")[0])  # a decoder embeds only with --task embed


def test_an_explicit_device_that_is_missing_is_named(exports, cpu_only_build):
    from edge_infer.contract.errors import UserError
    from edge_infer.runtime.embed import load_embedding

    with pytest.raises(UserError, match="device 'cuda' is not available"):
        load_embedding(exports("bert")[1], device="cuda")
    assert load_embedding(exports("bert")[1], device="cpu").plan.device == "cpu"


def test_show_describes_an_embedding_model(exports):
    from click.testing import CliRunner

    from edge_infer.cli import main

    result = CliRunner().invoke(main, ["show", str(exports("bert")[1])])
    assert result.exit_code == 0, result.output
    assert "embedding   encoder: mean pooling, L2-normalized, 64 dimensions" in result.output
    assert "padding" not in result.output and "KV cache" not in result.output
    ran = CliRunner().invoke(main, ["run", str(exports("bert")[1]), "hi"])
    assert ran.exit_code == 2 and "is an embedding model" in ran.output
