"""A server of several models (serve/multi.py over serve/registry.py): `edge-infer serve` with no model
serves the store; a request's model loads on first use, unloads after --keep-alive or to stay
within --max-loaded; each reply equals the same model run alone."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from edge_infer.contract.model_store import folder_of

HANG = 120  # seconds: a bound for a step that hangs, never a speed claim
MESSAGES = [{"role": "user", "content": "The quick brown fox"}]


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_checkpoints):
    """A store with two models exported by name."""
    from edge_infer.export.export_folder import ExportOptions, export_model

    home = tmp_path_factory.mktemp("many-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGE_INFER_HOME", str(home))
        export_model(tiny_checkpoints("llama"), folder_of("tiny-llama"), ExportOptions(quant="int4", max_length=64))
        export_model(tiny_checkpoints("qwen2"), folder_of("tiny-qwen:fp32"), ExportOptions(quant="fp32", max_length=64))
    return home


@pytest.fixture
def home(store, monkeypatch):
    monkeypatch.setenv("EDGE_INFER_HOME", str(store))
    return store


def alone(name: str, prompt=MESSAGES, n: int = 8) -> str:
    """The model's greedy reply, loaded and run in this process without a server."""
    import edge_infer

    return edge_infer.generate(edge_infer.load(name, threads=1), prompt, max_tokens=n)


def wait_until(check, what: str) -> None:
    for _ in range(HANG * 20):  # polled, no timing asserted: a bound for a hang only
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


def statuses(url: str) -> dict[str, str]:
    return {m["id"]: m["status"] for m in httpx.get(url + "/v1/models", timeout=HANG).json()["data"]}


def test_serve_with_no_model_chats_and_unloads_after_keep_alive(home):
    """The issue's walk: two models exported by name, `serve` with no model, chat with one through
    the official client, watch it unload after --keep-alive."""
    import openai

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "edge_infer.cli", "serve", "--port", "0", "--keep-alive", "1s",
                             "--parallel", "2", "--threads", "1"], stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    url_found = threading.Event()

    def read_stderr():
        for line in proc.stderr:
            lines.append(line)
            if "listening at" in line:
                url_found.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert url_found.wait(HANG), "".join(lines)
        url = re.search(r"listening at (http://\S+)/v1", "".join(lines)).group(1)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=HANG)
        listed = client.models.list().data
        assert [m.id for m in listed] == ["tiny-llama:latest", "tiny-qwen:fp32"]
        assert all(m.model_extra["status"] == "unloaded" for m in listed)

        reply = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=8, temperature=0)
        assert reply.model == "tiny-llama:latest"
        assert reply.choices[0].message.content == alone("tiny-llama")

        wait_until(lambda: statuses(url)["tiny-llama:latest"] == "unloaded", "the keep-alive unload")
        assert statuses(url)["tiny-qwen:fp32"] == "unloaded"  # never asked for, never loaded
        health = httpx.get(url + "/health", timeout=HANG).json()
        assert health["status"] == "ok" and health["models"] == {} and health["served"] == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=HANG) == 0
        reader.join(HANG)
        log = "".join(lines)
        assert "loaded tiny-llama:latest (chat)" in log and "unloaded tiny-llama:latest (keep-alive passed)" in log
        assert "loaded tiny-qwen" not in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def server(home):
    """An in-process server of the store's models: keep-alive never, at most one loaded."""
    from edge_infer.serve.app import make_app
    from edge_infer.serve.config import EngineConfig, ServerConfig
    from edge_infer.serve.metrics import Metrics
    from edge_infer.serve.multi import StoreModels
    from edge_infer.serve.registry import RegistrySettings
    from edge_infer.serve.runner import ServerThread

    models = StoreModels(None, EngineConfig(parallel=2), RegistrySettings(keep_alive_s=-1, max_loaded=1), threads=1)
    app = make_app(models, ServerConfig(model_id=""), Metrics())
    with ServerThread(app) as s:
        yield s, models


def test_the_least_recently_used_model_unloads_to_load_another(server):
    import openai

    s, models = server
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=HANG)
    first = client.chat.completions.create(model="tiny-llama:latest", messages=MESSAGES, max_tokens=8, temperature=0)
    assert first.choices[0].message.content == alone("tiny-llama")
    assert statuses(s.url) == {"tiny-llama:latest": "loaded", "tiny-qwen:fp32": "unloaded"}
    health = httpx.get(s.url + "/health", timeout=HANG).json()["models"]["tiny-llama:latest"]
    assert health["status"] == "loaded" and health["engine"] == "running" and health["requests"] == 0
    assert health["unloads_in_s"] is None  # keep-alive -1: never

    stream = client.completions.create(model="tiny-qwen:fp32", prompt="Paris is", max_tokens=8, temperature=0,
                                       stream=True)
    text = "".join(c.choices[0].text for c in stream if c.choices)
    assert text == alone("tiny-qwen:fp32", "Paris is")
    assert statuses(s.url) == {"tiny-llama:latest": "unloaded", "tiny-qwen:fp32": "loaded"}  # --max-loaded 1
    assert models.registry.unloads == ["tiny-llama:latest"]
    assert models.registry.snapshot()["tiny-qwen:fp32"]["requests"] == 0  # the stream's hold ended with it

    metrics = httpx.get(s.url + "/metrics", timeout=HANG).text
    for name in ("tiny-llama:latest", "tiny-qwen:fp32"):  # each model's counters, under its name
        assert re.search(rf'edge_infer_completion_tokens_total{{model="{re.escape(name)}"}} 8\.0', metrics)


def test_a_requests_keep_alive_sets_how_long_its_model_stays(server):
    """Ollama's keep_alive on a request (server: --keep-alive -1): 0 unloads the model after the reply,
    "1h" keeps it an hour after it, none leaves the server's (never); a bad one is a 400 before any load."""
    import openai

    s, models = server
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=HANG)
    expected = alone("tiny-llama")

    def ask(**extra) -> str:
        reply = client.chat.completions.create(model="tiny-llama:latest", messages=MESSAGES, max_tokens=8,
                                               temperature=0, extra_body=extra or None)
        return reply.choices[0].message.content

    def unloads_in() -> float | None:
        return httpx.get(s.url + "/health", timeout=HANG).json()["models"]["tiny-llama:latest"]["unloads_in_s"]

    assert ask(keep_alive=0) == expected
    wait_until(lambda: statuses(s.url)["tiny-llama:latest"] == "unloaded", "the unload after keep_alive 0")
    assert models.registry.unloads[-1] == "tiny-llama:latest"
    assert ask(keep_alive="1h") == expected
    assert 3000 < unloads_in() <= 3600
    assert ask() == expected and unloads_in() is None  # the server's --keep-alive -1 again
    bad = httpx.post(s.url + "/v1/chat/completions", timeout=HANG, json={
        "model": "tiny-qwen:fp32", "messages": MESSAGES, "max_tokens": 2, "keep_alive": "soon"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "keep_alive"
    assert statuses(s.url)["tiny-qwen:fp32"] == "unloaded"  # refused before loading it


def test_requests_the_server_cannot_place(server, home):
    import openai

    s, _ = server
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=HANG)
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="tiny-lama", messages=MESSAGES, max_tokens=2)
    assert "'tiny-lama'" in str(missing.value) and "'tiny-llama:latest'" in str(missing.value)
    no_model = httpx.post(s.url + "/v1/chat/completions", json={"messages": MESSAGES}, timeout=HANG)
    assert no_model.status_code == 400 and no_model.json()["error"]["code"] == "model_required"
    assert httpx.get(s.url + "/v1/models/tiny-qwen:fp32", timeout=HANG).json()["status"] == "unloaded"
    assert httpx.get(s.url + "/v1/models/nope", timeout=HANG).status_code == 404


def test_a_model_that_fails_to_load_is_an_answer_naming_it(home, tmp_path, monkeypatch):
    import shutil

    import openai

    from edge_infer.serve.app import make_app
    from edge_infer.serve.config import EngineConfig, ServerConfig
    from edge_infer.serve.metrics import Metrics
    from edge_infer.serve.multi import StoreModels
    from edge_infer.serve.registry import RegistrySettings
    from edge_infer.serve.runner import ServerThread

    copy = tmp_path / "home"
    shutil.copytree(home, copy)
    monkeypatch.setenv("EDGE_INFER_HOME", str(copy))
    data = folder_of("tiny-llama") / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 1
    data.write_bytes(bytes(raw))
    models = StoreModels(None, EngineConfig(parallel=1), RegistrySettings(keep_alive_s=-1), threads=1)
    with ServerThread(make_app(models, ServerConfig(model_id=""), Metrics())) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=HANG)
        with pytest.raises(openai.InternalServerError) as failed:
            client.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=2)
        assert "model 'tiny-llama:latest' failed to load" in str(failed.value) and "sha256" in str(failed.value)
        ok = client.chat.completions.create(model="tiny-qwen:fp32", messages=MESSAGES, max_tokens=8, temperature=0)
        assert ok.choices[0].message.content == alone("tiny-qwen:fp32")  # the other model is unaffected


def test_cli_options_of_a_server_of_several_models(home):
    from click.testing import CliRunner

    from edge_infer.cli import main
    from edge_infer.serve.commands import parse_duration, parse_size

    assert [parse_duration(t) for t in ("300", "90s", "5m", "1h", "0", "-1")] == [300, 90, 300, 3600, 0, -1]
    assert [parse_size(t) for t in ("8G", "512M", "100KiB", "1000")] == [8 << 30, 512 << 20, 100 << 10, 1000]
    for args, says in ((["--keep-alive", "soon"], "--keep-alive"), (["--keep-alive", "-5"], "only negative"),
                       (["--max-memory", "lots"], "--max-memory"), (["--model-name", "x"], "serve one model"),
                       (["tiny-llama", "nope"], "no model 'nope:latest'"),
                       (["tiny-llama", str(home)], "give store names")):
        r = CliRunner().invoke(main, ["serve", *args])
        assert r.exit_code == 2 and says in r.output, r.output


def test_ray_replicas_take_a_store_name(home, tmp_path, monkeypatch):
    """The cluster path (serve/cluster.py) loads a stored model's folder in every replica, served under
    its name; a folder path keeps working as before."""
    from edge_infer.contract.errors import UserError
    from edge_infer.serve.cluster import model_source

    assert model_source("tiny-qwen:fp32") == (str(folder_of("tiny-qwen:fp32").resolve()), "tiny-qwen:fp32")
    folder = folder_of("tiny-llama")
    assert model_source(str(folder)) == (str(folder.resolve()), "tiny-llama:latest")  # the store's folder
    with pytest.raises(UserError, match="did you mean tiny-llama:latest"):
        model_source("tiny-lama")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a model folder"):
        model_source("empty")


def test_chat_and_embeddings_from_one_server(home, tmp_path, monkeypatch):
    """A chat model and an embedding model behind one server of the store: each request's model loads as
    its own kind (engine or embedder), a model of the wrong kind for a route is a 400 saying so."""
    import shutil

    import numpy as np
    import openai

    import edge_infer
    from edge_infer.export.export_folder import ExportOptions, export_model
    from edge_infer.serve.app import make_app
    from edge_infer.serve.config import EngineConfig, ServerConfig
    from edge_infer.serve.metrics import Metrics
    from edge_infer.serve.multi import StoreModels
    from edge_infer.serve.registry import RegistrySettings
    from edge_infer.serve.runner import ServerThread
    from tiny_encoders import make_encoder_checkpoint

    copy = tmp_path / "home"
    shutil.copytree(home, copy)
    monkeypatch.setenv("EDGE_INFER_HOME", str(copy))
    export_model(make_encoder_checkpoint("bert", tmp_path / "bert"), folder_of("mini-embed"), ExportOptions(quant="int8"))
    texts = ["Paris is the capital of France.", "The quick brown fox"]
    models = StoreModels(["tiny-llama", "mini-embed"], EngineConfig(parallel=1), RegistrySettings(keep_alive_s=-1),
                         threads=1)
    with ServerThread(make_app(models, ServerConfig(model_id=""), Metrics())) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=HANG)
        got = client.embeddings.create(model="mini-embed", input=texts)
        want = edge_infer.embed("mini-embed", texts)
        assert got.model == "mini-embed:latest"
        assert np.allclose(np.array([d.embedding for d in got.data]), want, atol=1e-6)
        reply = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=8, temperature=0)
        assert reply.choices[0].message.content == alone("tiny-llama")
        assert statuses(s.url) == {"tiny-llama:latest": "loaded", "mini-embed:latest": "loaded"}
        health = httpx.get(s.url + "/health", timeout=HANG).json()["models"]
        assert health["mini-embed:latest"]["kind"] == "embed" and health["tiny-llama:latest"]["kind"] == "chat"
        with pytest.raises(openai.BadRequestError, match="embedding model"):
            client.chat.completions.create(model="mini-embed", messages=MESSAGES, max_tokens=2)
        with pytest.raises(openai.BadRequestError, match="chat model"):
            client.embeddings.create(model="tiny-llama", input="x")
