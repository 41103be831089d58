"""The Anthropic Messages API: POST /v1/messages and /v1/messages/count_tokens over the same engine.

A request is translated into the OpenAI-shaped messages and tools the rest of
the server speaks (system -> a system message; text blocks -> content;
tool_use blocks -> an assistant message's tool_calls; tool_result blocks ->
tool messages), prepared like a chat request (template, tools, grammar), and
submitted to the engine. The reply goes back as content blocks (text,
tool_use) with Anthropic's stop reasons, or streamed as Anthropic's events:
message_start, content_block_start / content_block_delta / content_block_stop
for each block, message_delta (stop reason, output tokens), message_stop.
Errors use Anthropic's shape {"type": "error", "error": {"type", "message"}}.
Authentication, Host checks and body limits are the server's middleware, as
for the OpenAI routes (`x-api-key` is accepted there alongside Bearer). Reading,
the model check, submission and the reply's parts are serve/http_layer.py's.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from edge_infer.serve.http_layer import (Done, Reasoning, Submission, Text, client_gone, error_route, generation,
                                         prepare_prompt, read_request, reasoning_split, server_state, submit)
from edge_infer.serve.protocol import APIError, Unknown, _sampling, _stops, bad, refuse_unknown, template_kwargs
from edge_infer.serve.request import Finished

_FIELDS = {"model", "messages", "system", "max_tokens", "stop_sequences", "temperature", "top_p", "top_k", "stream",
           "tools", "tool_choice", "metadata", "service_tier", "thinking", "chat_template_kwargs",
           "response_format"}  # beyond Anthropic's API: the OpenAI routes' structured output (and vLLM's guided_regex)
_COUNT_FIELDS = {"model", "messages", "system", "tools", "tool_choice", "thinking", "chat_template_kwargs"}
_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


def error_response(e: APIError) -> JSONResponse:
    kind = _ERROR_TYPES.get(e.status, "api_error")
    return JSONResponse({"type": "error", "error": {"type": kind, "message": e.message}}, status_code=e.status,
                        headers=e.headers)


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, block in enumerate(content):
            if not (isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str)):
                raise bad(f"{where}[{j}]", f"{where}[{j}] must be a text block {{'type': 'text', 'text': ...}}")
            parts.append(block["text"])
        return "".join(parts)
    raise bad(where, f"{where} must be a string or a list of text blocks")


def to_chat(body: dict, unknown: Unknown = refuse_unknown) -> tuple[list[dict], Any, Any, bool]:
    """(messages, tools, tool_choice, parallel) in the OpenAI shapes, from a Messages API body."""
    out: list[dict] = []
    if body.get("system") is not None:
        out.append({"role": "system", "content": _text(body["system"], "system")})
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "messages must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise bad(where, f"{where} must be {{'role': 'user' | 'assistant', 'content': ...}}")
        unknown(sorted(set(m) - {"role", "content"}), where, "role, content")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise bad(f"{where}.content", f"{where}.content must be a string or a list of content blocks")
        text, calls, results = [], [], 0
        for j, block in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text" and isinstance(block.get("text"), str):
                text.append(block["text"])
            elif kind == "tool_use" and m["role"] == "assistant" and isinstance(block.get("name"), str):
                calls.append({"id": str(block.get("id", "")), "type": "function",
                              "function": {"name": block["name"],
                                           "arguments": json.dumps(block.get("input", {}), ensure_ascii=False)}})
            elif kind == "tool_result" and m["role"] == "user" and isinstance(block.get("tool_use_id"), str):
                result = _text(block.get("content", ""), f"{at}.content")
                if block.get("is_error"):
                    result = "error: " + result
                out.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": result})
                results += 1
            else:
                raise bad(at, f"{at} must be a text block, a tool_use block (assistant) or a tool_result block "
                              f"(user); images and documents are not supported")
        if calls:
            out.append({"role": "assistant", "content": "".join(text), "tool_calls": calls})
        elif text or not results:
            out.append({"role": m["role"], "content": "".join(text)})
    return out, *_tools(body)


def _tools(body: dict) -> tuple[Any, Any, bool]:
    tools = body.get("tools")
    if tools is None:
        return None, None, True
    if not isinstance(tools, list):
        raise bad("tools", "tools must be a list of {name, description, input_schema}")
    converted = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or set(t) - {
                "name", "description", "input_schema", "type", "cache_control"}:
            raise bad(f"tools[{i}]", f"tools[{i}] must be {{'name': ..., 'description': ..., 'input_schema': {{...}}}}")
        converted.append({"type": "function", "function": {
            "name": t["name"], "description": t.get("description", ""),
            "parameters": t.get("input_schema", {"type": "object", "properties": {}})}})
    choice = body.get("tool_choice") or {"type": "auto"}
    if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
        raise bad("tool_choice", "tool_choice must be {'type': 'auto' | 'any' | 'tool' | 'none'}")
    parallel = not choice.get("disable_parallel_tool_use", False)
    kind = choice["type"]
    if kind == "tool":
        if not isinstance(choice.get("name"), str):
            raise bad("tool_choice", "tool_choice of type 'tool' needs a name")
        return converted, {"type": "function", "function": {"name": choice["name"]}}, parallel
    return converted, {"auto": "auto", "any": "required", "none": "none"}[kind], parallel


def _check(body: dict, allowed: set[str], unknown: Unknown) -> None:
    unknown(sorted(k for k in body if k not in allowed), "the request", ", ".join(sorted(allowed)))


def blocks(content: str | None, calls: list, reasoning: str | None = None) -> list[dict]:
    out = [{"type": "thinking", "thinking": reasoning, "signature": ""}] if reasoning is not None else []
    out += [{"type": "text", "text": content}] if content else []
    out += [{"type": "tool_use", "id": "toolu_" + c.id.removeprefix("call_"), "name": c.name,
             "input": json.loads(c.arguments)} for c in calls]
    return out or [{"type": "text", "text": ""}]


class _Blocks:
    """The content blocks of a streamed reply: a delta of another kind closes the open block first."""

    def __init__(self) -> None:
        self.index: int = 0
        self.open: str | None = None

    def delta(self, kind: str, text: str) -> bytes:  # kind: "text" | "thinking"
        out = b""
        if self.open != kind:
            out += self.close()
            block = {"type": "text", "text": ""} if kind == "text" else {"type": "thinking", "thinking": "",
                                                                          "signature": ""}
            out += _event("content_block_start", {"type": "content_block_start", "index": self.index,
                                                  "content_block": block})
            self.open = kind
        delta = {"type": "text_delta", "text": text} if kind == "text" else {"type": "thinking_delta",
                                                                              "thinking": text}
        return out + _event("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                                    "delta": delta})

    def close(self) -> bytes:
        if self.open is None:
            return b""
        self.open = None
        self.index += 1
        return _event("content_block_stop", {"type": "content_block_stop", "index": self.index - 1})


def _event(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


router = APIRouter(route_class=error_route(error_response))  # Anthropic's error shape on every route


async def _parse(request: Request, allowed: set[str]):
    body, served = await read_request(request)
    unknown = server_state(request).fields.found
    _check(body, allowed, unknown)
    messages, tools, choice, parallel = to_chat(body, unknown)
    response_format = body.get("response_format")
    if response_format is not None and not isinstance(response_format, dict):
        raise bad("response_format", "response_format must be an object such as {'type': 'json_object'}")
    prepared = await prepare_prompt(served, messages, kind="chat", tools=tools, tool_choice=choice,
                                    parallel_tool_calls=parallel, template_kwargs=_template_kwargs(body),
                                    response_format=response_format)
    return body, served, prepared


def _template_kwargs(body: dict) -> dict | None:
    """chat_template_kwargs, with Anthropic's `thinking` switch as the template's enable_thinking."""
    kwargs = template_kwargs(body)
    thinking = body.get("thinking")
    if thinking is None:
        return kwargs
    if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "disabled"):
        raise bad("thinking", "thinking must be {'type': 'enabled', 'budget_tokens': N} or {'type': 'disabled'}")
    return {"enable_thinking": thinking["type"] == "enabled", **(kwargs or {})}


@router.post("/v1/messages/count_tokens")
async def count_tokens(request: Request):
    _, _, prepared = await _parse(request, _COUNT_FIELDS)
    return {"input_tokens": len(prepared.ids)}


@router.post("/v1/messages")
async def messages(request: Request):
    body, served, prepared = await _parse(request, _FIELDS)
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise bad("max_tokens", f"max_tokens is required and must be a positive integer, got {max_tokens!r}")
    sampling = _sampling({k: body[k] for k in ("temperature", "top_p", "top_k") if body.get(k) is not None},
                         served.vocab_size)
    stops = _stops(body.get("stop_sequences"), server_state(request).config.max_stops)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream", "stream must be true or false")
    rid = "msg_" + uuid.uuid4().hex[:24]
    submission = submit(served, prepared, generation(prepared, max_tokens, sampling, stops, rid), "messages",
                        reasoning_split(request, served, prepared))
    name = body.get("model") if isinstance(body.get("model"), str) else served.model_id
    head = {"id": rid, "type": "message", "role": "assistant", "model": name}
    if stream:
        return submission.stream(_events(head, len(prepared.ids), submission))
    reply = await submission.collect(request)
    if reply is None:
        return client_gone()
    return {**head, "content": blocks(reply.content, reply.calls, reply.reasoning), **_stop(reply.finish, reply.final),
            "usage": _usage(reply.final.usage)}


async def _events(head: dict, n_prompt: int, submission: Submission) -> AsyncIterator[bytes]:
    yield _event("message_start", {"type": "message_start", "message": {
        **head, "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": n_prompt, "output_tokens": 0}}})
    out = _Blocks()
    async for part in submission.parts():
        if isinstance(part, Text):
            yield out.delta("text", part.text)
        elif isinstance(part, Reasoning):
            yield out.delta("thinking", part.text)
        elif isinstance(part, Done):
            yield out.close()
            for block in blocks(None, part.calls) if part.calls else []:
                yield _tool_use(out.index, block)
                out.index += 1
            yield _event("message_delta", {"type": "message_delta", "delta": _stop(part.finish, part.final),
                                           "usage": {"output_tokens": part.final.usage.completion_tokens}})
            yield _event("message_stop", {"type": "message_stop"})
        else:
            yield _event("error", {"type": "error", "error": {"type": "api_error", "message": part.message}})


def _tool_use(index: int, block: dict) -> bytes:
    """A tool_use block as Anthropic streams it: start (empty input), the input as one JSON delta, stop."""
    args = json.dumps(block["input"], ensure_ascii=False)
    return (_event("content_block_start", {"type": "content_block_start", "index": index,
                                           "content_block": {**block, "input": {}}})
            + _event("content_block_delta", {"type": "content_block_delta", "index": index,
                                             "delta": {"type": "input_json_delta", "partial_json": args}})
            + _event("content_block_stop", {"type": "content_block_stop", "index": index}))


def _stop(finish: str, final: Finished) -> dict:
    if final.stop_sequence is not None and finish == "stop":
        return {"stop_reason": "stop_sequence", "stop_sequence": final.stop_sequence}
    return {"stop_reason": _STOP.get(finish, "end_turn"), "stop_sequence": None}


def _usage(usage) -> dict:
    # As Anthropic counts: input_tokens excludes the prompt tokens read from the (prefix) cache.
    return {"input_tokens": usage.prompt_tokens - usage.cached_tokens, "output_tokens": usage.completion_tokens,
            "cache_read_input_tokens": usage.cached_tokens, "cache_creation_input_tokens": 0}
