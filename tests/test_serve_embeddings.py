"""POST /v1/embeddings: request checks, the response shape (float and base64), and a chat model asked to embed.

The route's answers are checked against runtime/embed.py on the same folder in the same run.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib

import httpx
import numpy as np
import openai
import pytest

from tiny_encoders import make_encoder_checkpoint

KEY = "test-key-0123456789"


@pytest.fixture(scope="module")
def embed_folder(tmp_path_factory):
    from edge_infer.export.export_folder import ExportOptions, export_model

    root = tmp_path_factory.mktemp("serve-embed")
    src = make_encoder_checkpoint("bert", root / "src")
    return export_model(src, root / "mini-embed", ExportOptions(quant="int8"))


@pytest.fixture(scope="module")
def embedder(embed_folder):
    from edge_infer.serve.embeddings import load_embedder

    return load_embedder(embed_folder, threads=1)


def _answer(embedder, body: dict) -> dict:
    from edge_infer.serve.embeddings import embed_request, parse_embedding_request

    return asyncio.run(embed_request(embedder, "mini-embed", parse_embedding_request(body)))


def test_float_and_base64_answers_match_the_runtime(embedder):
    texts = ["first text", "a second, longer text about Paris"]
    want = embedder.model.embed(texts)
    floats = _answer(embedder, {"input": texts})
    assert [d["index"] for d in floats["data"]] == [0, 1] and floats["model"] == "mini-embed"
    np.testing.assert_array_equal(np.array([d["embedding"] for d in floats["data"]], np.float32), want)
    packed = _answer(embedder, {"input": texts, "encoding_format": "base64"})
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in packed["data"]])
    np.testing.assert_array_equal(decoded, want)
    tokens = sum(len(i) for i in embedder.model.tokenize(texts))
    assert floats["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_token_arrays(embedder):
    ids = embedder.model.tokenize(["first text", "second"])
    one = _answer(embedder, {"input": ids[0]})
    many = _answer(embedder, {"input": ids})
    assert one["data"][0]["embedding"] == many["data"][0]["embedding"]
    assert many["usage"]["prompt_tokens"] == len(ids[0]) + len(ids[1])


@pytest.mark.parametrize("body, param, words", [
    ({"input": ""}, "input", "empty string"),
    ({"input": []}, "input", "non-empty"),
    ({"input": ["ok", 3]}, "input", "not a mix"),
    ({"input": [[1, 2], []]}, "input", "not a mix"),
    ({"input": "ok", "encoding_format": "int8"}, "encoding_format", "'float' or 'base64'"),
    ({"input": "ok", "dimensions": 0}, "dimensions", "positive integer"),
    ({"input": "ok", "dimensions": 16}, "dimensions", "not trained to be shortened"),
    ({"input": "word " * 400}, "input", "takes at most"),
    ({"input": [5, 10 ** 9]}, "input", "outside model"),
])
def test_bad_requests_are_400s_naming_the_field(embedder, body, param, words):
    from edge_infer.serve.protocol import APIError

    with pytest.raises(APIError) as e:
        _answer(embedder, body)
    assert e.value.status == 400 and e.value.param == param and words in e.value.message


def test_a_chat_model_asked_to_embed_says_what_to_do(tiny_exports):
    import edge_infer
    from edge_infer.serve.app import build_app
    from edge_infer.serve.config import EngineConfig, ServerConfig
    from edge_infer.serve.runner import ServerThread

    model = edge_infer.load(tiny_exports("llama", "fp32"), device="cpu", threads=1)
    app = build_app(model, ServerConfig(model_id="tiny-chat", api_key=KEY), EngineConfig(parallel=1))
    with ServerThread(app) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0, timeout=30)
        with pytest.raises(openai.BadRequestError) as e:
            client.embeddings.create(model="tiny-chat", input="hello")
        assert "'tiny-chat' is a text-generation model" in str(e.value) and "--task embed" in str(e.value)
        with pytest.raises(openai.NotFoundError):
            client.embeddings.create(model="no-such-model", input="hello")


@contextlib.contextmanager
def serving(args: list[str]):
    """`edge-infer serve ARGS` in a subprocess; yields its base URL, then stops it with SIGTERM (exit 0)."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import threading

    proc = subprocess.Popen([sys.executable, "-m", "edge_infer.cli", "serve", *args, "--port", "0", "--threads", "1"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if "listening at" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(120), "".join(lines)
        yield re.search(r"listening at (http://\S+)/v1", "".join(lines)).group(1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def check_embeddings(url: str, model: str, reference: str, served: str) -> None:
    """The official client's embeddings call (base64 on the wire, its default, and float) answers what
    edge_infer.embed(reference) answers."""
    import edge_infer

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    texts = ["a lighthouse on black rock", "bread"]
    got = client.embeddings.create(model=model, input=texts)
    np.testing.assert_allclose(np.array([d.embedding for d in got.data]), edge_infer.embed(reference, texts), atol=1e-6)
    assert got.usage.prompt_tokens == got.usage.total_tokens > 0 and got.model == served
    floats = client.embeddings.create(model=model, input=texts, encoding_format="float")
    assert [d.embedding for d in floats.data] == [d.embedding for d in got.data]


def test_serve_one_embedding_model_by_name(embed_folder, tmp_path, monkeypatch):
    """`edge-infer serve NAME` of an embedding model serves /v1/embeddings (through the registry), answering
    what edge_infer.embed answers."""
    import shutil

    from edge_infer.contract.model_store import folder_of

    monkeypatch.setenv("EDGE_INFER_HOME", str(tmp_path / "home"))
    shutil.copytree(embed_folder, folder_of("mini-embed"))
    with serving(["mini-embed"]) as url:
        check_embeddings(url, "mini-embed", "mini-embed", "mini-embed:latest")


def test_serve_one_embedding_folder_by_path(embed_folder, tmp_path, monkeypatch):
    """`edge-infer serve FOLDER` of an embedding model (was refused: "import it by name") serves it through
    the same registry as a store name, under the folder's name; a request naming no model gets it."""
    monkeypatch.setenv("EDGE_INFER_HOME", str(tmp_path / "empty-home"))  # nothing in the store
    with serving([str(embed_folder)]) as url:
        check_embeddings(url, "mini-embed", str(embed_folder), "mini-embed")
        assert [m["id"] for m in httpx.get(url + "/v1/models", timeout=120).json()["data"]] == ["mini-embed"]
        unnamed = httpx.post(url + "/v1/embeddings", json={"input": "bread"}, timeout=120)
        assert unnamed.status_code == 200 and unnamed.json()["model"] == "mini-embed"
        chat = httpx.post(url + "/v1/chat/completions", json={"model": "mini-embed", "messages": [
            {"role": "user", "content": "hi"}]}, timeout=120)
        assert chat.status_code == 400 and chat.json()["error"]["code"] == "wrong_model_kind"
