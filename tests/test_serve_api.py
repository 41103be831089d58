"""The HTTP API with the official `openai` client: routes, streaming, usage, errors, security rules.

One server on a free loopback port runs a tiny random model for the whole module.
"""

import asyncio
import json
import logging

import httpx
import openai
import pytest

import edge_infer
from edge_infer.runtime.generate import generate
from edge_infer.serve.app import build_app
from edge_infer.serve.config import EngineConfig, ServerConfig
from edge_infer.serve.runner import ServerThread

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
HELLO = [{"role": "user", "content": "Paris is the capital of France."}]


@pytest.fixture(scope="module")
def model(tiny_exports):
    return edge_infer.load(tiny_exports("llama", "fp32"), device="cpu", threads=1)


@pytest.fixture(scope="module")
def server(model):
    app = build_app(model, ServerConfig(model_id="tiny", api_key=KEY, allowed_hosts=("models.example",)),
                    EngineConfig(parallel=3, prefill_chunk=8))
    with ServerThread(app) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=30)


def reference(model, prompt, **kw) -> str:
    return generate(model, prompt, **kw)


def test_chat_non_streaming_matches_the_runtime(client, model):
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12)
    assert r.object == "chat.completion" and r.model == "tiny" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == reference(model, HELLO, max_tokens=12)
    assert r.choices[0].finish_reason in ("stop", "length")
    u = r.usage
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens and 1 <= u.completion_tokens <= 12
    assert u.prompt_tokens_details.cached_tokens >= 0


def test_chat_streaming_joins_to_the_full_text_with_usage(client, model):
    chunks = list(client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference(model, HELLO, max_tokens=12)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert all(c.usage is None for c in chunks[:-1])


def test_second_identical_request_reports_cached_tokens(client):
    messages = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog."}]
    first = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4)
    second = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4)
    assert second.choices[0].message.content == first.choices[0].message.content
    assert second.usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens - 1


def test_completions_streaming_and_not(client, model):
    r = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=10)
    assert r.object == "text_completion" and r.choices[0].text == reference(model, "The quick brown", max_tokens=10)
    s = list(client.completions.create(model="tiny", prompt="The quick brown", max_tokens=10, stream=True))
    assert "".join(c.choices[0].text for c in s) == r.choices[0].text
    ids = model.tokenizer.encode("The quick brown", add_special_tokens=True)
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=10)
    assert by_ids.choices[0].text == r.choices[0].text


def test_stop_string_is_cut_and_never_leaks(client, model):
    full = reference(model, "Numbers 0123456789", max_tokens=30)
    stop = full[len(full) // 2:len(full) // 2 + 2]
    expect = full[:full.find(stop)]
    r = client.completions.create(model="tiny", prompt="Numbers 0123456789", max_tokens=30, stop=[stop])
    assert r.choices[0].text == expect and r.choices[0].finish_reason == "stop"
    s = list(client.completions.create(model="tiny", prompt="Numbers 0123456789", max_tokens=30, stop=stop,
                                       stream=True))
    assert "".join(c.choices[0].text for c in s) == expect


def test_length_exactly_at_the_context_limit(client, model):
    prompt = "Tabs and  double  spaces."
    n = len(model.tokenizer.encode(prompt, add_special_tokens=True))
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=128 - n, stop=None)
    assert r.usage.total_tokens <= 128
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 128 - n
    default = client.completions.create(model="tiny", prompt=prompt)  # no max_tokens: the rest of the context
    assert default.usage.total_tokens <= 128


def test_async_client_streams_concurrently(server, model):
    async def main():
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        prompts = ["The quick brown fox", "Emoji 🙂🚀 and more", "def f(x): return x * 2", "日本語のテキスト"]

        async def one(p):
            stream = await c.completions.create(model="tiny", prompt=p, max_tokens=15, stream=True)
            return "".join([ch.choices[0].text async for ch in stream])

        async def whole(p):
            r = await c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": p}],
                                                max_tokens=15)
            return r.choices[0].message.content

        got = await asyncio.gather(*[one(p) for p in prompts], *[whole(p) for p in prompts])
        await c.close()
        return prompts, got

    prompts, got = asyncio.run(main())
    want = [reference(model, p, max_tokens=15) for p in prompts]
    want += [reference(model, [{"role": "user", "content": p}], max_tokens=15) for p in prompts]
    assert got == want


def test_models_route(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")


@pytest.mark.parametrize("extra, param", [
    ({"temperature": 5}, "temperature"), ({"top_p": 0}, "top_p"), ({"n": 2}, "n"), ({"max_tokens": 0}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"tools": [{"type": "function"}]}, "tools"),
    ({"messages": []}, "messages"), ({"seed": "x"}, "seed"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"), ({"logprobs": True}, "logprobs"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"stream_options": {"include_usage": True}}, "stream_options"), ({"top_k": -1}, "top_k"),
])
def test_bad_parameters_are_400_naming_the_field(server, extra, param):
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 4, **extra}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers=AUTH)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


def test_context_overflow_is_400_context_length_exceeded(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=1000)
    assert e.value.code == "context_length_exceeded" and "lower max_tokens" in e.value.message
    long = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 40}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=long)
    assert e.value.code == "context_length_exceeded" and e.value.param == "messages"


def test_bad_json_body_size_and_content_type(server):
    url = server.url + "/v1/chat/completions"
    r = httpx.post(url, content=b"{not json", headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(url, content=json.dumps({"messages": HELLO}), headers={**AUTH, "Content-Type": "text/plain"})
    assert r.status_code == 415
    huge = {"messages": [{"role": "user", "content": "x" * (1 << 20)}]}
    r = httpx.post(url, json=huge, headers=AUTH)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit is enforced while reading
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(17):
            yield b"x" * 65536
        yield b'"}]}'

    r = httpx.post(url, content=chunked(), headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413


def test_api_key_on_every_route_but_health(server):
    for path in ("/v1/models", "/metrics", "/v1/models/tiny"):
        assert httpx.get(server.url + path).status_code == 401
        assert httpx.get(server.url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(server.url + path, headers=AUTH).status_code == 200
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": HELLO})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(server.url + "/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_host_header_allow_list(server):
    for host in ("evil.example", "evil.example:8000", "localhost.evil.example"):
        r = httpx.get(server.url + "/health", headers={"Host": host})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host"
    for host in ("localhost", f"localhost:{server.port}", "127.0.0.1", "[::1]:80", "models.example"):
        assert httpx.get(server.url + "/health", headers={"Host": host}).status_code == 200


def test_no_cors_headers_by_default(server):
    r = httpx.options(server.url + "/v1/chat/completions",
                      headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(server.url + "/health", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_cors_only_for_named_origins(model):
    app = build_app(model, ServerConfig(model_id="tiny", cors_origins=("http://localhost:3000",)),
                    EngineConfig(parallel=1))
    with ServerThread(app) as s:
        pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
        r = httpx.options(s.url + "/v1/chat/completions", headers={"Origin": "http://localhost:3000", **pre})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
        r = httpx.options(s.url + "/v1/chat/completions", headers={"Origin": "http://evil.example", **pre})
        assert r.headers.get("access-control-allow-origin") != "http://evil.example"


def test_unknown_route_has_the_openai_error_shape(server):
    r = httpx.get(server.url + "/v1/nothing", headers=AUTH)
    assert r.status_code == 404 and "message" in r.json()["error"]


def test_no_route_takes_file_paths_or_manages_models(server):
    from edge_infer.serve.http_layer import route_table

    assert route_table(server.app) == {(("GET",), "/health"), (("GET",), "/metrics"), (("GET",), "/v1/models"),
                      (("GET",), "/v1/models/{model_id:path}"), (("POST",), "/v1/chat/completions"),
                      (("POST",), "/v1/completions"), (("POST",), "/v1/messages"),
                      (("POST",), "/v1/messages/count_tokens"), (("GET",), "/"), (("GET",), "/ui/{name}"),
                                        (("POST",), "/v1/embeddings")}


def test_metrics_and_request_log_without_prompt_text(server, client, caplog):
    secret = "zebra-unicorn-secret"
    with caplog.at_level(logging.INFO, logger="edge_infer.serve"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": secret}], max_tokens=5)
    lines = [r.getMessage() for r in caplog.records if r.name == "edge_infer.serve"]
    assert any("prompt" in m and "first token" in m for m in lines)
    assert not any(secret in m for m in lines)
    text = httpx.get(server.url + "/metrics", headers=AUTH).text
    for name in ("edge_infer_requests_total{route=\"/v1/chat/completions\",status=\"200\"}",
                 "edge_infer_time_to_first_token_seconds_count", "edge_infer_inter_token_latency_seconds_count",
                 "edge_infer_queue_depth", "edge_infer_active_slots", "edge_infer_prefix_cache_hits_total",
                 "edge_infer_prompt_tokens_total", "edge_infer_completion_tokens_total",
                 "edge_infer_kv_cache_used_ratio{kind=\"cached\"}"):
        assert name in text, name
