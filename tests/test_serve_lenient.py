"""Lenient request parsing (issue 24 item 5): a client written for llama-server or Ollama sends extras.

By default unknown fields are ignored (logged once per name, counted in /metrics) and the extras that
mean one of our features are honoured (n_predict, options.*, cache_prompt, keep_alive); `--strict`
gives back the OpenAI API's 400 naming the field. Every reply is checked against the runtime's own
generation of the same prompt in the same run.
"""

from __future__ import annotations

import logging

import httpx
import pytest

import edge_infer
from edge_infer.runtime.generate import generate
from edge_infer.serve.app import build_app
from edge_infer.serve.config import EngineConfig, ServerConfig
from edge_infer.serve.runner import ServerThread

HELLO = [{"role": "user", "content": "Paris is the capital of France."}]
# What llama-server's and Ollama's clients send beside the OpenAI fields.
EXTRAS = {"cache_prompt": True, "keep_alive": "5m", "n_probs": 0, "id_slot": -1, "frobnicate": {"x": 1}}


@pytest.fixture(scope="module")
def model(tiny_exports):
    return edge_infer.load(tiny_exports("llama", "fp32"), device="cpu", threads=1)


def serving(model, strict: bool = False) -> ServerThread:
    return ServerThread(build_app(model, ServerConfig(model_id="tiny", strict=strict),
                                  EngineConfig(parallel=2, prefill_chunk=64)))


@pytest.fixture(scope="module")
def server(model):
    with serving(model) as s:
        yield s


def chat(server, body: dict) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": HELLO, **body},
                      timeout=60)


def test_unknown_fields_are_ignored_logged_once_and_counted(server, model, caplog):
    with caplog.at_level(logging.WARNING, logger="edge_infer.serve"):
        for _ in range(2):
            r = chat(server, {"max_tokens": 6, "temperature": 0, **EXTRAS})
            assert r.status_code == 200, r.text  # was a 400 unknown_parameter
            assert r.json()["choices"][0]["message"]["content"] == generate(model, HELLO, max_tokens=6)
    warned = [m.getMessage() for m in caplog.records if "frobnicate" in m.getMessage()]
    assert len(warned) == 1 and "--strict" in warned[0]
    metrics = httpx.get(server.url + "/metrics").text
    assert 'edge_infer_ignored_fields_total{field="frobnicate"} 2.0' in metrics
    assert 'edge_infer_ignored_fields_total{field="n_probs"} 2.0' in metrics
    assert 'field="cache_prompt"' not in metrics  # honoured, not ignored


def test_llama_server_and_ollama_extras_are_honoured(server, model):
    want = generate(model, HELLO, max_tokens=7)
    r = chat(server, {"n_predict": 7, "temperature": 0})
    assert r.json()["usage"]["completion_tokens"] == 7 and r.json()["choices"][0]["message"]["content"] == want
    r = chat(server, {"options": {"num_predict": 7, "temperature": 0, "top_k": 1, "seed": 3, "num_ctx": 2048}})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 7 and r.json()["choices"][0]["message"]["content"] == want
    stop = want.strip().split()[-1]  # a word of the greedy reply: options.stop cuts the reply before it
    r = chat(server, {"options": {"num_predict": 7, "temperature": 0, "stop": [stop]}})
    assert r.json()["choices"][0]["message"]["content"] == want[:want.index(stop)]
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    r = chat(server, {"max_tokens": 3, "n_predict": 7, "options": {"num_predict": 9}})
    assert r.json()["usage"]["completion_tokens"] == 3  # the OpenAI field wins
    r = chat(server, {"options": {"temperature": 9}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"  # checked as the field it means


def test_unknown_message_fields_and_anthropic_fields_are_ignored(server, model):
    messages = [{**HELLO[0], "images": None, "thinking": ""}]
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": "tiny", "messages": messages, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == generate(model, HELLO, max_tokens=4)
    r = httpx.post(server.url + "/v1/messages", timeout=60, json={
        "model": "tiny", "messages": messages, "max_tokens": 4, "temperature": 0, "cache_prompt": True, "frob": 1})
    assert r.status_code == 200, r.text
    assert r.json()["content"][0]["text"] == generate(model, HELLO, max_tokens=4)


def test_keep_alive_is_read_as_ollama_does_and_a_one_model_server_says_once_it_ignores_it(model, caplog):
    from edge_infer.serve.fields import keep_alive_seconds

    assert [keep_alive_seconds(v) for v in (300, 2.5, 0, -1, -30, "5m", "1h30m", "90s", "300ms", "0", "-1", "-1m")] \
        == [300, 2.5, 0, -1, -1, 300, 5400, 90, 0.3, 0, -1, -1]
    with serving(model) as s, caplog.at_level(logging.WARNING, logger="edge_infer.serve"):
        for keep in ("5m", 0):
            r = chat(s, {"max_tokens": 4, "temperature": 0, "keep_alive": keep})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == generate(model, HELLO, max_tokens=4)
        for keep in ("soon", True, "5 m", [1]):
            r = chat(s, {"max_tokens": 4, "keep_alive": keep})
            assert r.status_code == 400 and r.json()["error"]["param"] == "keep_alive", r.text
        metrics = httpx.get(s.url + "/metrics").text
    warned = [m.getMessage() for m in caplog.records if "keep_alive" in m.getMessage()]
    assert len(warned) == 1 and "holds its one model" in warned[0] and "several models" in warned[0]
    assert 'edge_infer_ignored_fields_total{field="keep_alive"} 2.0' in metrics


def test_strict_gives_back_the_400s(model):
    with serving(model, strict=True) as s:
        r = chat(s, {"max_tokens": 4, "frobnicate": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "frobnicate"
        assert r.json()["error"]["code"] == "unknown_parameter" and "frobnicate" in r.json()["error"]["message"]
        r = chat(s, {"n_predict": 4})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n_predict"
        r = httpx.post(s.url + "/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": [{**HELLO[0], "images": None}], "max_tokens": 4})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0]"
        r = httpx.post(s.url + "/v1/messages", timeout=60,
                       json={"model": "tiny", "messages": HELLO, "max_tokens": 4, "frob": 1})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_a_scan_of_field_names_cannot_grow_the_metric_labels(caplog):
    from edge_infer.serve.fields import MAX_NAMES, UnknownFields

    counted: list[str] = []
    fields = UnknownFields(count=counted.append)
    with caplog.at_level(logging.WARNING, logger="edge_infer.serve"):
        for i in range(MAX_NAMES + 10):
            fields.found([f"f{i}"], "the request", "")
        fields.found(["f0"], "the request", "")
    assert counted[:MAX_NAMES] == [f"f{i}" for i in range(MAX_NAMES)]
    assert counted[MAX_NAMES:] == ["other"] * 10 + ["f0"]
    assert len([r for r in caplog.records if "ignoring" in r.getMessage()]) == MAX_NAMES  # once per name
