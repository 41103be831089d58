"""Structured output and tool calls through the server with the official `openai` client (a tiny random model).

The tiny model writes noise when left alone, so every parsed object below comes from the grammar.
"""

import json
import threading

import jsonschema
import openai
import pytest
from typing import Literal

from pydantic import BaseModel, Field

import edge_infer
from edge_infer.runtime.speculative import SpeculativeConfig
from edge_infer.serve.app import build_app
from edge_infer.serve.config import EngineConfig, ServerConfig
from edge_infer.serve.runner import ServerThread

HELLO = [{"role": "user", "content": "Paris is the capital of France."}]
SCHEMA = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "rank": {"type": "integer",
          "minimum": 1, "maximum": 3}, "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
          "required": ["city", "rank", "tags"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "place", "schema": SCHEMA, "strict": True}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                                           "days": {"type": "integer", "minimum": 1,
                                                                    "maximum": 7}},
                         "required": ["city", "days"]}}},
         {"type": "function", "function": {"name": "add", "description": "Add numbers",
          "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                                           "b": {"type": "integer", "minimum": 0, "maximum": 9}},
                         "required": ["a", "b"]}}}]


class Place(BaseModel):
    city: Literal["Paris", "Rome"]  # bounded fields: a random model would fill a free string until max_tokens
    rank: int = Field(ge=1, le=3)
    tags: list[Literal["a", "b"]] = Field(max_length=2)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny llama with a 1024-token context: a tool prompt is ~600 tokens in the tiny 360-word vocabulary."""
    from tiny import make_checkpoint
    from edge_infer.export.export_folder import ExportOptions, export_model

    root = tmp_path_factory.mktemp("tools-llama")
    ckpt = make_checkpoint("llama", root / "ckpt", max_position_embeddings=1024)
    folder = export_model(ckpt, root / "model", ExportOptions(quant="fp32", max_length=1024, validate=False))
    return edge_infer.load(folder, device="cpu", threads=1)


@pytest.fixture(scope="module")
def server(model):
    app = build_app(model, ServerConfig(model_id="tiny"),
                    EngineConfig(parallel=3, prefill_chunk=8, speculative=SpeculativeConfig("lookup")))
    with ServerThread(app) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def test_one_grammar_complete_rule_in_library_and_server(model, client):
    """A grammar complete on the last id max_tokens allows ends with "stop", in stream_generate and in
    the server alike (Decoding.finish); one id short it is "length" in both."""
    def library(n: int) -> tuple[str, int]:
        last = list(edge_infer.stream_generate(model, HELLO, max_tokens=n, response_format=FORMAT))[-1]
        return last.finish_reason.value, last.timings.generation_tokens

    def server(n: int) -> tuple[str, int]:
        r = client.chat.completions.create(model="tiny", messages=HELLO, response_format=FORMAT, max_tokens=n)
        return r.choices[0].finish_reason, r.usage.completion_tokens

    for run in (library, server):
        reason, n = run(80)  # the grammar completes before max_tokens
        assert reason == "stop" and n > 1, run.__name__
        assert run(n) == ("stop", n), run.__name__  # complete on the last id allowed
        assert run(n - 1) == ("length", n - 1), run.__name__


def test_parse_with_a_pydantic_model(client):
    r = client.chat.completions.parse(model="tiny", messages=HELLO, response_format=Place, max_tokens=80)
    place = r.choices[0].message.parsed
    assert isinstance(place, Place) and r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_streaming_and_not(client, stream):
    if stream:
        chunks = list(client.chat.completions.create(model="tiny", messages=HELLO, response_format=FORMAT,
                                                     max_tokens=80, stream=True, temperature=1.0, seed=3))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    else:
        r = client.chat.completions.create(model="tiny", messages=HELLO, response_format=FORMAT, max_tokens=80,
                                           temperature=1.0, seed=3)
        text, finish = r.choices[0].message.content, r.choices[0].finish_reason
    assert finish == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_and_completions_route(client):
    r = client.chat.completions.create(model="tiny", messages=HELLO, response_format={"type": "json_object"},
                                       max_tokens=90, extra_body={"repetition_penalty": 1.5})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].finish_reason == "length"
    r = client.completions.create(model="tiny", prompt="Paris is", max_tokens=80,
                                  extra_body={"response_format": FORMAT})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)


def test_concurrent_constrained_and_free_requests_match_their_solo_runs(client, model):
    """Each batched row has its own matcher: three different grammars decoding together give what each gives alone."""
    formats = [FORMAT, {"type": "json_schema", "json_schema": {"name": "n", "schema": {
        "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}}, None]
    solo = [edge_infer.generate(model, HELLO, max_tokens=80, response_format=f) for f in formats]
    out = [None] * 3

    def ask(i):
        kw = {"response_format": formats[i]} if formats[i] else {}
        out[i] = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=80, **kw)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.choices[0].message.content for r in out] == solo
    json.loads(solo[0]), json.loads(solo[1])


def test_prefix_cache_hit_keeps_grammar_state(client):
    first = client.chat.completions.create(model="tiny", messages=HELLO, response_format=FORMAT, max_tokens=80)
    again = client.chat.completions.create(model="tiny", messages=HELLO, response_format=FORMAT, max_tokens=80)
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    assert again.choices[0].message.content == first.choices[0].message.content
    jsonschema.validate(json.loads(again.choices[0].message.content), SCHEMA)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_tool_call_round_trip(client, choice):
    messages = [{"role": "user", "content": "What is 2 plus 3?"}]
    r = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice=choice,
                                       parallel_tool_calls=False, max_tokens=150)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and len(msg.tool_calls) == 1
    call = msg.tool_calls[0]
    assert call.id.startswith("call_") and call.type == "function"
    if choice != "required":
        assert call.function.name == "add"
    schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), schema)
    # the call and its result go back into the history; the model answers (or calls again)
    messages += [msg.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "5"}]
    r2 = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=20)
    assert r2.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_streamed_tool_call_deltas_reassemble(client):
    messages = [{"role": "user", "content": "Weather in Rome?"}]
    kw = dict(model="tiny", messages=messages, tools=TOOLS, tool_choice="required", max_tokens=150,
              parallel_tool_calls=False)
    whole = client.chat.completions.create(**kw, seed=1, temperature=0.7)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(**kw, seed=1, temperature=0.7, stream=True):
        if not chunk.choices:
            continue
        finish = chunk.choices[0].finish_reason or finish
        for d in chunk.choices[0].delta.tool_calls or []:
            c = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            c["id"] = d.id or c["id"]
            c["name"] += (d.function.name or "") if d.function else ""
            c["arguments"] += (d.function.arguments or "") if d.function else ""
    assert finish == whole.choices[0].finish_reason == "tool_calls"
    expected = [(c.function.name, json.loads(c.function.arguments)) for c in whole.choices[0].message.tool_calls]
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == expected
    assert all(c["id"].startswith("call_") for c in calls.values())


def test_auto_tool_choice_gives_text_or_a_valid_call(client):
    for seed in range(3):
        r = client.chat.completions.create(model="tiny", messages=HELLO, tools=TOOLS, max_tokens=40,
                                           temperature=1.0, seed=seed)
        msg = r.choices[0].message
        if msg.tool_calls:
            assert r.choices[0].finish_reason == "tool_calls"
            for c in msg.tool_calls:
                json.loads(c.function.arguments)
        else:
            assert not (msg.content or "").lstrip().startswith("{")


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": "json"}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": FORMAT}, "response_format"),
])
def test_bad_structured_requests_are_400_naming_the_field(client, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=5, extra_body=body)
    assert e.value.body["param"] == param, e.value.body


def test_speculation_under_a_grammar_verifies_valid_guesses_and_matches_plain_decoding(server, client, model):
    """A lone request speculates (prompt lookup): guesses are cut where the grammar refuses them, rows are
    masked, the matcher rolls back with the cache. Greedy output equals the runtime's plain constrained decode."""
    engine = server.app.state.engine
    metric = engine.metrics.speculative.labels("accepted")
    before = metric._value.get()
    example = '{"city": "Rome", "rank": 3, "tags": ["a", "b"]} {"city": "Rome", "rank": 3, "tags": ["a", "b"]}'
    messages = [{"role": "user", "content": f"Copy this: {example}"}]
    r = client.chat.completions.create(model="tiny", messages=messages, response_format=FORMAT, max_tokens=80)
    assert metric._value.get() > before  # guesses were accepted in verification passes
    want = edge_infer.generate(model, messages, max_tokens=80, response_format=FORMAT)
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(want), SCHEMA)
