"""Tool calling formats (runtime/tools.py): checking tools, rendering, grammars, parsing replies."""

import json

import jsonschema
import pytest

import edge_infer
from edge_infer.runtime.chat_template import ChatTemplate
from edge_infer.runtime.constrain import closed
from edge_infer.contract.errors import UserError
from edge_infer.runtime.generate import FinishReason, stream_generate
from edge_infer.runtime.tools import (Function, ToolPlan, parse_reply, parse_tool_choice, parse_tools, plan_tools,
                                      tool_messages)

ADD = {"type": "function", "function": {"name": "add", "description": "Add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["a", "b"]}}}
# A Hermes/Qwen-style template that renders `tools` itself.
NATIVE = (
    "{% if tools %}<|im_start|>system\nTools: {% for t in tools %}{{ t.function.name }} {% endfor %}<|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "<tool_call>\n{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}\n</tool_call>"
    "{% endfor %}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def plan(fmt="generic", choice="auto", parallel=True):
    return ToolPlan(parse_tools([ADD]), choice, parallel, fmt, None)


@pytest.mark.parametrize("tools, message", [
    ("x", "must be a list"), ([{"type": "function"}], "tools[0] must be"),
    ([{"type": "function", "function": {"name": "a b"}}], "name must be"),
    ([ADD, ADD], "used twice"),
    ([{"type": "function", "function": {"name": "f", "parameters": []}}], "parameters must be"),
    ([{"type": "function", "function": {"name": "f", "extra": 1}}], "unknown field"),
])
def test_bad_tools(tools, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_tools(tools)


def test_tool_choice():
    fs = parse_tools([ADD])
    assert parse_tool_choice(None, fs) == "auto" and parse_tool_choice(None, ()) == "none"
    assert parse_tool_choice({"type": "function", "function": {"name": "add"}}, fs) == "add"
    for bad in ({"type": "function", "function": {"name": "sub"}}, "always", {"type": "function"}):
        with pytest.raises(UserError):
            parse_tool_choice(bad, fs)
    with pytest.raises(UserError, match="needs tools"):
        parse_tool_choice("required", ())


def test_parse_replies_in_each_syntax():
    content, calls = parse_reply('{"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}]}', plan())
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [("add", {"a": 1, "b": 2})]
    assert parse_reply("Hello there", plan()) == ("Hello there", [])
    assert parse_reply('{"tool_calls": [{"name": "sub", "arguments": {}}]}', plan())[1] == []  # not one of ours
    native = plan("native")
    text = 'Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n' \
           '<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call>'
    content, calls = parse_reply(text, native)
    assert content == "Let me add." and [json.loads(c.arguments)["a"] for c in calls] == [1, 3]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
    content, calls = parse_reply('{"name": "add", "parameters": {"a": 5, "b": 6}}', native)  # Llama 3
    assert calls[0].name == "add" and json.loads(calls[0].arguments) == {"a": 5, "b": 6}
    content, calls = parse_reply('[TOOL_CALLS] [{"name": "add", "arguments": {"a": 7, "b": 8}}]', native)  # Mistral
    assert json.loads(calls[0].arguments) == {"a": 7, "b": 8}
    assert parse_reply("<tool_call>\nnot json", native) == ("<tool_call>\nnot json", [])


def test_closed_schema_forbids_extra_keys_only_where_unspecified():
    s = closed({"type": "object", "properties": {"x": {"type": "object", "properties": {"y": {"type": "integer"}}},
                                                 "z": {"type": "object", "additionalProperties": True}}})
    assert s["additionalProperties"] is False and s["properties"]["x"]["additionalProperties"] is False
    assert s["properties"]["z"]["additionalProperties"] is True
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"x": {"y": 1, "w": 2}}, s)


def test_history_with_calls_and_results_in_both_formats():
    history = [{"role": "user", "content": "add 1 and 2"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "3"}]
    generic, extra = tool_messages(history, plan())
    assert extra == {} and generic[0]["role"] == "system" and "add" in generic[0]["content"]
    assert json.loads(generic[2]["content"]) == {"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}]}
    assert generic[3] == {"role": "user", "content": "[result of call_1]\n3"}
    native, extra = tool_messages(history, plan("native"))
    assert extra["tools"][0]["function"]["name"] == "add"
    assert native[1]["tool_calls"][0]["function"]["arguments"] == {"a": 1, "b": 2}  # an object, as transformers
    assert native[2]["role"] == "tool"
    text = ChatTemplate(NATIVE).render(native, **extra)
    assert "Tools: add" in text and '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}' in text


@pytest.fixture(scope="module")
def model(tiny_exports):
    return edge_infer.load(tiny_exports("llama", "fp32"), device="cpu", threads=1)


def test_native_template_required_call_is_constrained_to_tool_call_blocks(model):
    saved = model.chat_template
    model.chat_template = ChatTemplate(NATIVE, eos_token="<|im_end|>")
    try:
        assert plan_tools(parse_tools([ADD]), "required", False, model.chat_template).format == "native"
        chunks = list(stream_generate(model, [{"role": "user", "content": "add"}], tools=[ADD],
                                      tool_choice="required", parallel_tool_calls=False, max_tokens=89))
        text = "".join(c.text for c in chunks)
        assert text.startswith("<tool_call>\n{") and text.rstrip().endswith("</tool_call>")
        last = chunks[-1]
        assert last.finish_reason == FinishReason.TOOL_CALLS and len(last.tool_calls) == 1
        jsonschema.validate(json.loads(last.tool_calls[0].arguments), ADD["function"]["parameters"])
    finally:
        model.chat_template = saved


def test_tool_choice_none_leaves_tools_out(model):
    with_none = list(stream_generate(model, [{"role": "user", "content": "hi"}], tools=[ADD], tool_choice="none",
                                     max_tokens=5))
    plain = list(stream_generate(model, [{"role": "user", "content": "hi"}], max_tokens=5))
    assert [c.token for c in with_none] == [c.token for c in plain] and with_none[-1].tool_calls == ()


def test_function_record():
    f = Function("f", "d", {"type": "object"})
    assert f.openai() == {"type": "function", "function": {"name": "f", "description": "d",
                                                           "parameters": {"type": "object"}}}


def test_triggered_matcher_is_free_until_the_trigger_and_again_after_the_call(model):
    """The lazy grammar of `auto` on a native template, with a stand-in trigger token: free text passes
    unmasked; after the trigger only a valid call body; after </tool_call> free again."""
    import numpy as np

    from edge_infer.runtime.constrain import constrain_guesses
    from edge_infer.runtime.tools import TriggeredMatcher, _constraint

    enc = lambda t: model.tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
    trigger = enc("<|im_start|>")[0]
    c = _constraint(parse_tools([ADD]), "auto", True, "native", None, trigger=trigger)
    m = c.matcher(model)
    assert isinstance(m, TriggeredMatcher) and not m.active
    logits = np.zeros(model.manifest.geometry.vocab_size, dtype=np.float32)
    assert np.isfinite(m.mask(logits)).all()  # free text
    for t in enc("Sure. "):
        m.accept(t)
    guesses, _, masks = constrain_guesses(m, enc("ok") + [trigger] + enc("zz"), None)
    assert guesses == enc("ok") + [trigger] and len(masks) == len(guesses) + 1
    m.accept(trigger)
    assert m.active and np.isinf(m.mask(logits)).any()  # only a call body now
    body = enc('\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>')
    n = m.validate(body)
    assert n == len(body)
    guesses, _, masks = constrain_guesses(m, body + enc("Done"), None)
    assert guesses == body and (masks[-1] == -1).all()  # the row after the call: anything again
    assert m.active and m.validate(body) == len(body)  # rolled back
    for t in body:
        m.accept(t)
    assert not m.active and not m.finished and np.isfinite(m.mask(logits)).all()


def test_a_constrained_tool_choice_refuses_a_second_grammar(model):
    """One rule (runtime.tools.output_constraint) for the library and the server's request check."""
    from edge_infer.serve.protocol import APIError
    from edge_infer.serve.structured import prepare

    messages = [{"role": "user", "content": "add"}]
    with pytest.raises(UserError, match="response_format or grammar cannot be combined with tool_choice 'required'"):
        list(stream_generate(model, messages, tools=[ADD], tool_choice="required",
                             response_format={"type": "json_object"}, max_tokens=4))
    with pytest.raises(APIError, match="response_format cannot be combined with tool_choice 'required'"):
        prepare(model, messages, kind="chat", response_format={"type": "json_object"}, tools=[ADD],
                tool_choice="required")
    # tool_choice "none" leaves the request's own grammar in force
    assert prepare(model, messages, kind="chat", response_format={"type": "json_object"}, tools=[ADD],
                   tool_choice="none").constraint is not None


def test_the_two_grammars_refusal_names_what_was_sent_and_what_to_send(model):
    """A request that already sent tool_choice 'auto' is not told to use 'auto': the text names the
    conflict (the tools' grammar under auto, a required or named call) and the way out."""
    from edge_infer.serve.protocol import APIError
    from edge_infer.serve.structured import prepare

    messages = [{"role": "user", "content": "add"}]
    for choice, sent in [("auto", "tools under tool_choice 'auto'"), ("required", "tool_choice 'required'"),
                         ({"type": "function", "function": {"name": "add"}}, "tool_choice naming function 'add'")]:
        with pytest.raises(APIError) as e:
            prepare(model, messages, kind="chat", response_format={"type": "json_object"}, tools=[ADD],
                    tool_choice=choice)
        text = str(e.value)
        assert "use tool_choice 'auto'" not in text
        assert f"response_format cannot be combined with {sent}" in text
        assert "tool_choice 'none'" in text and "Leave out response_format" in text.replace("leave", "Leave")
