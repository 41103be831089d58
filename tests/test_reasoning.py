"""Reasoning models (issue 24 item 2), on a tiny random Qwen3 with Qwen3's real chat template.

A random model never writes `<think>` by itself, so the replies here are forced through the
grammar (a regex constraint: the engine masks every other token), and arrive through the same
detokenizer and SSE streams as any reply. Checked: template variables reach the template (Python
`template_kwargs=`, server `chat_template_kwargs`, Anthropic `thinking`, Ollama `think`: the prompt
token count equals the runtime's own render); the thinking comes back as `reasoning_content`
(streamed as its own deltas) and as Anthropic `thinking` blocks; a tag cut across deltas never
leaks; max_tokens counts both; `--reasoning-format none` leaves the text as it was.
"""

from __future__ import annotations

import json
import re

import httpx
import pytest
from qwen3_template import QWEN3_CHAT_TEMPLATE

import edge_infer
from edge_infer.runtime.chat_template import ChatTemplate
from edge_infer.runtime.generate import encode_prompt, stream_generate
from edge_infer.runtime.reasoning import ReasoningSplitter, emits_thinking, split_reasoning
from edge_infer.serve.app import build_app
from edge_infer.serve.config import EngineConfig, ServerConfig
from edge_infer.serve.runner import ServerThread

HELLO = [{"role": "user", "content": "Paris is the capital of France."}]
THOUGHT, ANSWER = "The user states a fact.\nAgree.", "Yes, Paris."
REPLY = f"<think>\n{THOUGHT}\n</think>\n\n{ANSWER}"
FORCED = {"type": "regex", "regex": re.escape(REPLY)}  # the grammar allows exactly this reply


@pytest.fixture(scope="module")
def model(tiny_exports):
    m = edge_infer.load(tiny_exports("qwen3", "fp32"), device="cpu", threads=1)
    tok = m.manifest.tokenizer
    m.chat_template = ChatTemplate(QWEN3_CHAT_TEMPLATE, bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")
    assert emits_thinking(m.chat_template)
    return m


def serving(model, **config) -> ServerThread:
    return ServerThread(build_app(model, ServerConfig(model_id="qwen3", **config),
                                  EngineConfig(parallel=2, prefill_chunk=64)))


@pytest.fixture(scope="module")
def server(model):
    with serving(model) as s:
        yield s


def sse(r: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]


def test_template_kwargs_reach_the_template_from_python(model):
    plain = encode_prompt(model, HELLO)
    off = encode_prompt(model, HELLO, {"enable_thinking": False})
    want = model.chat_template.render(HELLO, enable_thinking=False)
    assert want.endswith("<think>\n\n</think>\n\n") and off == model.tokenizer.encode(want, add_special_tokens=False)
    assert len(off) > len(plain)
    chunks = list(stream_generate(model, HELLO, max_tokens=3, template_kwargs={"enable_thinking": False}))
    assert chunks[-1].timings.prompt_tokens == len(off)
    with pytest.raises(edge_infer.UserError, match="template_kwargs"):
        encode_prompt(model, HELLO, {"messages": []})


def test_the_splitter_on_a_forced_token_stream_matches_the_whole_text(model):
    deltas = [c.text for c in stream_generate(model, HELLO, max_tokens=80, grammar=FORCED, temperature=0)]
    assert "".join(deltas) == REPLY and len(deltas) > 10  # token by token: the tags arrive in pieces
    splitter = ReasoningSplitter()
    pieces = [p for d in deltas for p in splitter.feed(d)] + splitter.finish()
    assert "".join(t for k, t in pieces if k == "reasoning") == THOUGHT
    assert "".join(t for k, t in pieces if k == "content") == ANSWER
    assert not any("<" in t or ">" in t for _, t in pieces)  # no piece of a tag leaks either way
    assert split_reasoning(REPLY) == (THOUGHT, ANSWER)
    assert split_reasoning(f"{THOUGHT}\n</think>\n\n{ANSWER}", inside=True) == (THOUGHT, ANSWER)  # opened by the prompt
    assert split_reasoning(ANSWER) == (None, ANSWER)


def test_reasoning_content_whole_and_streamed(server, model):
    body = {"model": "qwen3", "messages": HELLO, "max_tokens": 80, "guided_regex": re.escape(REPLY)}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    message = r.json()["choices"][0]["message"]
    assert message["reasoning_content"] == THOUGHT and message["content"] == ANSWER, r.text
    n_reply = len(model.tokenizer.encode(REPLY, add_special_tokens=False))
    assert r.json()["usage"]["completion_tokens"] >= n_reply - 5  # thinking tokens are completion tokens
    r = httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60)
    deltas = [c["choices"][0]["delta"] for c in sse(r) if c["choices"]]
    reasoning = [d["reasoning_content"] for d in deltas if "reasoning_content" in d]
    content = [d["content"] for d in deltas if d.get("content")]
    assert "".join(reasoning) == THOUGHT and "".join(content) == ANSWER and len(reasoning) > 1
    first_content = next(i for i, d in enumerate(deltas) if d.get("content"))
    assert all("reasoning_content" not in d for d in deltas[first_content:])  # thinking comes first


def test_max_tokens_counts_the_thinking(server, model):
    deltas = [c.text for c in stream_generate(model, HELLO, max_tokens=80, grammar=FORCED, temperature=0)]
    n = next(i for i in range(len(deltas)) if len("".join(deltas[:i])) > len("<think>\nThe"))  # cut in the thinking
    body = {"model": "qwen3", "messages": HELLO, "max_tokens": n, "guided_regex": re.escape(REPLY)}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    assert r["usage"]["completion_tokens"] == n and r["choices"][0]["finish_reason"] == "length"
    message = r["choices"][0]["message"]
    assert message["content"] == "" and len(message["reasoning_content"]) >= 3
    assert THOUGHT.startswith(message["reasoning_content"])


def test_chat_template_kwargs_reach_the_template_on_both_apis(server, model):
    off = len(encode_prompt(model, HELLO, {"enable_thinking": False}))
    assert off != len(encode_prompt(model, HELLO))
    for extra in ({"chat_template_kwargs": {"enable_thinking": False}}, {"think": False}):
        r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                       json={"model": "qwen3", "messages": HELLO, "max_tokens": 2, **extra})
        assert r.json()["usage"]["prompt_tokens"] == off, extra
    for extra in ({"chat_template_kwargs": {"enable_thinking": False}}, {"thinking": {"type": "disabled"}}):
        r = httpx.post(server.url + "/v1/messages/count_tokens", json={"model": "qwen3", "messages": HELLO, **extra})
        assert r.json()["input_tokens"] == off, extra
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": "qwen3", "messages": HELLO, "chat_template_kwargs": ["x"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs"


def test_anthropic_thinking_blocks(server):
    body = {"model": "qwen3", "messages": HELLO, "max_tokens": 80, "guided_regex": re.escape(REPLY)}
    r = httpx.post(server.url + "/v1/messages", json=body, timeout=60)
    assert [b["type"] for b in r.json()["content"]] == ["thinking", "text"], r.text
    assert r.json()["content"][0]["thinking"] == THOUGHT and r.json()["content"][1]["text"] == ANSWER
    r = httpx.post(server.url + "/v1/messages", json={**body, "stream": True}, timeout=60)
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    starts = [e["content_block"]["type"] for e in events if e["type"] == "content_block_start"]
    assert starts == ["thinking", "text"]
    thinking = "".join(e["delta"]["thinking"] for e in events if e["type"] == "content_block_delta"
                       and e["delta"]["type"] == "thinking_delta")
    text = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta"
                   and e["delta"]["type"] == "text_delta")
    assert thinking == THOUGHT and text == ANSWER
    assert [e["index"] for e in events if e["type"] == "content_block_stop"] == [0, 1]


def test_reasoning_format_none_leaves_the_text_in_content(model):
    with serving(model, reasoning_format="none") as s:
        body = {"model": "qwen3", "messages": HELLO, "max_tokens": 80, "guided_regex": re.escape(REPLY)}
        message = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"]
        assert message["content"] == REPLY and "reasoning_content" not in message


@pytest.mark.parametrize("hide", [False, True])
def test_run_shows_thinking_dimmed_or_hides_it(tiny_exports, tmp_path, hide):
    from click.testing import CliRunner

    from edge_infer.cli import main

    template = tmp_path / "qwen3.jinja"
    template.write_text(QWEN3_CHAT_TEMPLATE, encoding="utf-8")
    args = ["run", str(tiny_exports("qwen3", "fp32")), "Paris is the capital of France.", "--no-stats",
            "--chat-template", str(template), "--regex", re.escape(REPLY), "--max-tokens", "80", "--device", "cpu"]
    r = CliRunner().invoke(main, args + (["--hide-thinking"] if hide else []), color=True)
    assert r.exit_code == 0, r.output
    if hide:
        assert r.stdout == ANSWER + "\n"
    else:
        dim = re.findall(r"\x1b\[2m(.*?)\x1b\[0m", r.stdout, flags=re.S)
        assert "".join(dim) == THOUGHT and r.stdout.endswith("\n\n" + ANSWER + "\n") and "<think>" not in r.stdout
