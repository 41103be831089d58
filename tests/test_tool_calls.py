"""Tool calls are never lost (issue 24 item 4): a named tool_choice is one call; a call repeating an
earlier one ends the list; a reply cut by max_tokens inside the list returns the calls completed.

On a tiny random llama behind the real server and in stream_generate: with a tool whose only
argument is a constant, every call the grammar lets the model write is the same call, and this model
(greedy) keeps writing them, as SmolLM2 did with the reported request (tests/test_tool_calls_default_model.py
replays that one on the default model). Server replies are checked against stream_generate's in the
same run; the parsing rules against the reported reply's own text.
"""

from __future__ import annotations

import json

import openai
import pytest
from tiny import make_checkpoint

import edge_infer
from edge_infer.export.export_folder import ExportOptions, export_model
from edge_infer.runtime.tools import CallWatch, parse_tool_choice, parse_tools, plan_tools, split_calls
from edge_infer.serve.app import build_app
from edge_infer.serve.config import EngineConfig, ServerConfig
from edge_infer.serve.runner import ServerThread

TOOL = {"type": "function", "function": {"name": "get_time", "description": "The time in a timezone", "parameters": {
    "type": "object", "properties": {"timezone": {"const": "UTC"}}, "required": ["timezone"],
    "additionalProperties": False}}}
ASK = [{"role": "user", "content": "Paris is the capital of France."}]
CALL = '{"name": "get_time", "arguments": {"timezone": "UTC"}}'


def plan(choice="required", parallel=True, fmt_template=None):
    functions = parse_tools([TOOL])
    return plan_tools(functions, parse_tool_choice(choice, functions), parallel, fmt_template)


def test_the_reported_replies_give_their_calls():
    p = plan()
    looping = '{"tool_calls": [' + CALL + ", " + CALL + ', {"name": "get'  # cut by max_tokens in the third call
    content, calls, finish = split_calls(looping, "length", p)
    assert finish == "length" and [c.name for c in calls] == ["get_time"] and content is None
    assert json.loads(calls[0].arguments) == {"timezone": "UTC"}
    content, calls, finish = split_calls('{"tool_calls": [' + CALL + ", " + CALL + "]}", "stop", p)
    assert finish == "tool_calls" and len(calls) == 1  # the repeat ends the list
    assert split_calls('{"tool_calls": [{"name": "get', "length", p) == ('{"tool_calls": [{"name": "get', [], "length")
    watch, fired = CallWatch(p), []
    text = '{"tool_calls": [' + CALL + ", " + CALL + ", " + CALL
    for i, ch in enumerate(text):
        if watch.feed(ch):
            fired.append(i + 1)
    assert fired[0] == len('{"tool_calls": [' + CALL + ", " + CALL)  # when the second call closes, not before


def test_hermes_style_calls_cut_inside_the_list():
    from edge_infer.runtime.chat_template import ChatTemplate

    native = plan(fmt_template=ChatTemplate("{{ tools }}{% for m in messages %}{{ m.content }}{% endfor %}"))
    assert native.format == "native"
    text = f"<tool_call>\n{CALL}\n</tool_call>\n<tool_call>\n{{\"name\": \"get_t"
    content, calls, finish = split_calls(text, "length", native)
    assert finish == "length" and len(calls) == 1 and content is None


def test_a_named_choice_allows_one_call():
    assert plan({"type": "function", "function": {"name": "get_time"}}).parallel is False
    assert plan("required").parallel is True and plan("required", parallel=False).parallel is False


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tools")  # 1024 positions: the tools' system message is long for this tokenizer
    folder = export_model(make_checkpoint("llama", d / "ckpt", max_position_embeddings=1024), d / "model",
                          ExportOptions(quant="fp32", max_length=1024))
    return edge_infer.load(folder, device="cpu", threads=1)


@pytest.fixture(scope="module")
def client(model):
    with ServerThread(build_app(model, ServerConfig(model_id="tiny"), EngineConfig(parallel=2))) as s:
        yield openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=120)


def local(model, **kw):
    chunks = list(edge_infer.stream_generate(model, ASK, tools=[TOOL], temperature=0, **kw))
    return "".join(c.text for c in chunks), chunks[-1]


def test_a_repeated_call_ends_the_reply(model, client):
    text, last = local(model, tool_choice="required", max_tokens=200)
    assert text.count(CALL) == 2  # this model repeats the call: the second one ends the reply
    assert last.finish_reason == edge_infer.FinishReason.TOOL_CALLS and len(last.tool_calls) == 1
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=[TOOL], tool_choice="required",
                                       temperature=0, max_tokens=200)
    assert r.choices[0].finish_reason == "tool_calls" and len(r.choices[0].message.tool_calls) == 1
    assert r.usage.completion_tokens == last.timings.generation_tokens < 200
    stream = client.chat.completions.create(model="tiny", messages=ASK, tools=[TOOL], tool_choice="required",
                                            temperature=0, max_tokens=200, stream=True)
    chunks = list(stream)
    streamed = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or []) if tc.id]
    assert len(streamed) == 1 and chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_named_choice_gives_one_call(model, client):
    choice = {"type": "function", "function": {"name": "get_time"}}
    text, last = local(model, tool_choice=choice, max_tokens=200)
    assert text == '{"tool_calls": [' + CALL + "]}" and last.finish_reason == edge_infer.FinishReason.TOOL_CALLS
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=[TOOL], tool_choice=choice,
                                       temperature=0, max_tokens=200)
    assert r.choices[0].finish_reason == "tool_calls" and len(r.choices[0].message.tool_calls) == 1


def test_a_cut_inside_the_list_returns_the_calls_completed(model, client):
    n_one = len(model.tokenizer.encode('{"tool_calls": [' + CALL, add_special_tokens=False))
    for budget in range(n_one, n_one + 12):  # past the first call, short of the second (the reply is 2 calls)
        text, last = local(model, tool_choice="required", max_tokens=budget)
        if last.tool_calls:
            break
    assert last.finish_reason == edge_infer.FinishReason.LENGTH and len(last.tool_calls) == 1 and CALL in text
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=[TOOL], tool_choice="required",
                                       temperature=0, max_tokens=budget)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == budget
    assert [c.function.arguments for c in r.choices[0].message.tool_calls] == ['{"timezone": "UTC"}']
