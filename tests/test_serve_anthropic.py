"""The Anthropic Messages API (/v1/messages) with the official `anthropic` client, on a tiny random model."""

import json

import anthropic
import httpx
import jsonschema
import pytest

import edge_infer
from edge_infer.runtime.generate import generate
from edge_infer.serve.app import build_app
from edge_infer.serve.config import EngineConfig, ServerConfig
from edge_infer.serve.runner import ServerThread

KEY = "test-key-0123456789"
HELLO = [{"role": "user", "content": "Paris is the capital of France."}]
TOOLS = [{"name": "add", "description": "Add two digits", "input_schema": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["a", "b"]}}]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny llama with a 1024-token context (the generic tool prompt is ~600 tiny-vocabulary tokens)."""
    from tiny import make_checkpoint
    from edge_infer.export.export_folder import ExportOptions, export_model

    root = tmp_path_factory.mktemp("anthropic-llama")
    ckpt = make_checkpoint("llama", root / "ckpt", max_position_embeddings=1024)
    folder = export_model(ckpt, root / "model", ExportOptions(quant="fp32", max_length=1024, validate=False))
    return edge_infer.load(folder, device="cpu", threads=1)


@pytest.fixture(scope="module")
def server(model):
    app = build_app(model, ServerConfig(model_id="tiny", api_key=KEY), EngineConfig(parallel=2, prefill_chunk=64))
    with ServerThread(app) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)


def test_create_matches_the_runtime(client, model):
    r = client.messages.create(model="tiny", max_tokens=12, system="Be brief.", messages=HELLO)
    want = generate(model, [{"role": "system", "content": "Be brief."}] + HELLO, max_tokens=12)
    assert r.type == "message" and r.role == "assistant" and r.id.startswith("msg_")
    assert r.content[0].type == "text" and r.content[0].text == want
    assert r.stop_reason in ("end_turn", "max_tokens") and r.usage.output_tokens <= 12
    assert r.usage.input_tokens + (r.usage.cache_read_input_tokens or 0) > 0


def test_stream_events_join_to_the_same_text(client):
    whole = client.messages.create(model="tiny", max_tokens=12, messages=HELLO)
    with client.messages.stream(model="tiny", max_tokens=12, messages=HELLO) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert final.content[0].text == whole.content[0].text and final.stop_reason == whole.stop_reason
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_start" in kinds and "content_block_stop" in kinds and "message_delta" in kinds


def test_stop_sequence_is_reported(client, model):
    text = generate(model, HELLO, max_tokens=12)
    stop = text[3:5]
    r = client.messages.create(model="tiny", max_tokens=12, messages=HELLO, stop_sequences=["\x07", stop])
    assert r.stop_reason == "stop_sequence" and r.stop_sequence == stop and r.content[0].text == text[:3]


def test_tool_use_round_trip_and_stream(client):
    msgs = [{"role": "user", "content": "What is 2 plus 3?"}]
    r = client.messages.create(model="tiny", max_tokens=150, messages=msgs, tools=TOOLS,
                               tool_choice={"type": "tool", "name": "add", "disable_parallel_tool_use": True})
    assert r.stop_reason == "tool_use"
    use = [b for b in r.content if b.type == "tool_use"]
    assert len(use) == 1 and use[0].name == "add" and use[0].id.startswith("toolu_")
    jsonschema.validate(use[0].input, TOOLS[0]["input_schema"])
    with client.messages.stream(model="tiny", max_tokens=150, messages=msgs, tools=TOOLS,
                                tool_choice={"type": "tool", "name": "add", "disable_parallel_tool_use": True}) as stream:
        final = stream.get_final_message()
    streamed = [b for b in final.content if b.type == "tool_use"]
    assert final.stop_reason == "tool_use" and streamed[0].input == use[0].input
    # the result goes back as a tool_result block
    msgs += [{"role": "assistant", "content": [b.model_dump() for b in r.content]},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use[0].id, "content": "5"}]}]
    again = client.messages.create(model="tiny", max_tokens=10, messages=msgs, tools=TOOLS,
                                   tool_choice={"type": "none"})
    assert again.stop_reason in ("end_turn", "max_tokens") and again.content[0].type == "text"


def test_count_tokens(client, model):
    from edge_infer.runtime.generate import encode_prompt

    n = client.messages.count_tokens(model="tiny", messages=HELLO).input_tokens
    assert n == len(encode_prompt(model, HELLO))
    with_tools = client.messages.count_tokens(model="tiny", messages=HELLO, tools=TOOLS).input_tokens
    assert with_tools > n


def test_errors_and_auth(server, client):
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="tiny", max_tokens=0, messages=HELLO)
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="tiny", max_tokens=5, messages=[{"role": "user", "content": [
            {"type": "image", "source": {}}]}])
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0).messages.create(
            model="tiny", max_tokens=5, messages=HELLO)
    body = {"model": "tiny", "max_tokens": 3, "messages": HELLO}
    r = httpx.post(server.url + "/v1/messages", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.json()["type"] == "message"
    r = httpx.post(server.url + "/v1/messages", json=body)
    assert r.status_code == 401
    r = httpx.post(server.url + "/v1/messages", json=body, headers={"x-api-key": KEY, "Host": "evil.example"})
    assert r.status_code == 400  # the Host allow-list holds here too
    json.dumps(r.json())


def test_other_model_names_are_404_in_anthropic_shape(server):
    import httpx

    body = {"model": "claude-3-5-sonnet-latest", "max_tokens": 4, "messages": HELLO}
    r = httpx.post(server.url + "/v1/messages", json=body, headers={"x-api-key": KEY}, timeout=30)
    assert r.status_code == 404
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "not_found_error"
    assert "--model-alias" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/messages/count_tokens", json={"model": "nope", "messages": HELLO},
                   headers={"x-api-key": KEY}, timeout=30)
    assert r.status_code == 404
