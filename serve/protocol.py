"""The OpenAI wire format: request bodies in, response bodies and error shapes out.

Bodies are checked by hand rather than by pydantic models, so that every
refusal is an OpenAI-shaped 400 naming the field, what was expected and what
was given. Fields we honour are read; fields that only annotate a request are
ignored; fields for features we lack are refused unless they hold their
default; unknown fields are refused (a typo must not silently do nothing).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from edge_infer.contract.errors import UserError, check_text
from edge_infer.runtime.sampling import SamplingParams
from edge_infer.runtime.stops import MAX_STOP_CHARS

CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MAX_MESSAGES = 4096
_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
             "frequency_penalty", "seed")
_COMMON = {"model", "max_tokens", "stop", "stream", "stream_options", "n", *_SAMPLING}
_IGNORED = {"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"}
# Features we do not have: accepted only at these "off" values.
_CHAT_OFF = {"logprobs": (None, False), "top_logprobs": (None, 0), "functions": (None, []),
             "function_call": (None, "none", "auto"), "logit_bias": (None, {}), "modalities": (None, ["text"]),
             "audio": (None,), "prediction": (None,), "reasoning_effort": (None,), "web_search_options": (None,)}
_COMPLETION_OFF = {"logprobs": (None, 0), "echo": (None, False), "suffix": (None, ""), "best_of": (None, 1),
                   "logit_bias": (None, {})}


class APIError(Exception):
    """An error answered in the OpenAI shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


# What a parser does with the unknown fields of one object: (names, where, what is honoured) -> None.
# `refuse_unknown` is the OpenAI API's answer; the server passes serve.fields.UnknownFields.found.
Unknown = Callable[[list[str], str, str], None]


def refuse_unknown(names: list[str], where: str, honoured: str) -> None:
    if names:
        raise bad(names[0] if where == "the request" else where,
                  f"unknown field(s) {', '.join(repr(k) for k in names)} in {where}; this server honours "
                  f"{honoured}", code="unknown_parameter")


@dataclass(frozen=True)
class ParsedRequest:
    kind: str  # "chat" | "completion"
    prompt: Any  # chat: [{"role", "content"}] with string content; completion: str or [int]
    max_tokens: int | None
    sampling: SamplingParams
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    response_format: Any = None  # checked and compiled by runtime.constrain.constraint_from
    tools: Any = None  # checked by runtime.tools
    tool_choice: Any = None
    parallel_tool_calls: bool = True
    template_kwargs: Any = None  # chat_template_kwargs: more variables for the chat template


def parse_chat(body: dict, max_stops: int, vocab_size: int, unknown: Unknown = refuse_unknown) -> ParsedRequest:
    _check_fields(body, _COMMON | {"messages", "max_completion_tokens", "response_format", "tools", "tool_choice",
                                   "parallel_tool_calls", "chat_template_kwargs"}, _CHAT_OFF, unknown)
    messages = _messages(body.get("messages"), unknown)
    max_tokens = _max_tokens(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _max_tokens(body, "max_tokens")
    parsed = _parsed("chat", messages, max_tokens, body, max_stops, vocab_size)
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise bad("parallel_tool_calls", f"parallel_tool_calls must be true or false, got {parallel!r}")
    tools = body.get("tools") or None
    return dataclasses.replace(parsed, tools=tools, tool_choice=body.get("tool_choice"),
                               parallel_tool_calls=parallel, template_kwargs=template_kwargs(body))


def template_kwargs(body: dict) -> dict | None:
    """chat_template_kwargs (vLLM's and llama-server's name): more variables for the chat template."""
    value = body.get("chat_template_kwargs")
    if value is not None and not (isinstance(value, dict) and all(isinstance(k, str) for k in value)):
        raise bad("chat_template_kwargs", "chat_template_kwargs must be an object of template variables, e.g. "
                  "{\"enable_thinking\": false}")
    return value


def parse_completion(body: dict, max_stops: int, vocab_size: int,
                     unknown: Unknown = refuse_unknown) -> ParsedRequest:
    _check_fields(body, _COMMON | {"prompt", "response_format"}, _COMPLETION_OFF, unknown)
    return _parsed("completion", _prompt(body.get("prompt"), vocab_size), _max_tokens(body, "max_tokens"),
                   body, max_stops, vocab_size)


def _parsed(kind: str, prompt: Any, max_tokens: int | None, body: dict, max_stops: int,
            vocab_size: int) -> ParsedRequest:
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise bad("n", f"n must be 1 (one choice per request), got {n!r}; send several requests instead")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad("stream", f"stream must be true or false, got {stream!r}")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"}:
            raise bad("stream_options", "stream_options must be an object with only include_usage (a boolean)")
        include_usage = options.get("include_usage") is True
        if not stream:
            raise bad("stream_options", "stream_options is only allowed with stream: true")
    response_format = body.get("response_format")
    if response_format is not None and not isinstance(response_format, dict):
        raise bad("response_format", "response_format must be an object such as {'type': 'json_object'}")
    return ParsedRequest(kind, prompt, max_tokens, _sampling(body, vocab_size), _stops(body.get("stop"), max_stops),
                         bool(stream), include_usage, response_format)


def _check_fields(body: dict, honoured: set[str], off: dict[str, tuple], unknown: Unknown) -> None:
    unknown(sorted(k for k in body if k not in honoured and k not in _IGNORED and k not in off), "the request",
            ", ".join(sorted(honoured)))
    if "model" in body and not isinstance(body["model"], str):
        raise bad("model", f"model must be a string, got {type(body['model']).__name__}")
    for name, allowed in off.items():
        if name in body and body[name] not in allowed:
            raise bad(name, f"{name} is not supported by this server; leave it out", code="unsupported_parameter")


def _text(value: str, param: str) -> str:
    """Text that is valid Unicode; a lone surrogate ("\\ud800" in the JSON) is a 400 naming the field."""
    try:
        return check_text(value, param)
    except UserError as e:
        raise bad(param, str(e), code="invalid_unicode") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _max_tokens(body: dict, name: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not _is_int(v) or v < 1:
        raise bad(name, f"{name} must be a positive integer, got {v!r}")
    return v


def _sampling(body: dict, vocab_size: int) -> SamplingParams:
    ranges = {  # name: (check, what is allowed)
        "temperature": (lambda v: _is_number(v) and 0 <= v <= 2, "a number in [0, 2] (0 = greedy)"),
        "top_p": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
        "top_k": (lambda v: _is_int(v) and 0 <= v <= vocab_size, f"an integer in [0, {vocab_size}] (0 = off)"),
        "min_p": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1) (0 = off)"),
        "repetition_penalty": (lambda v: _is_number(v) and 0 < v <= 10, "a number in (0, 10] (1 = off)"),
        "presence_penalty": (lambda v: _is_number(v) and -2 <= v <= 2, "a number in [-2, 2]"),
        "frequency_penalty": (lambda v: _is_number(v) and -2 <= v <= 2, "a number in [-2, 2]"),
        "seed": (lambda v: _is_int(v) and -2**63 <= v < 2**64, "an integer"),
    }
    values = {}
    for name, (ok, allowed) in ranges.items():
        v = body.get(name)
        if v is None:
            continue
        if not ok(v):
            raise bad(name, f"{name} must be {allowed}, got {v!r}")
        values[name] = v
    if values.get("seed", 0) < 0:  # the OpenAI API takes any 64-bit integer; our RNG wants a non-negative one
        values["seed"] += 2**64
    return SamplingParams.from_dict(values)


def _stops(stop: Any, max_stops: int) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise bad("stop", "stop must be a string or a list of strings")
    if len(items) > max_stops:
        raise bad("stop", f"stop has {len(items)} strings; at most {max_stops} are allowed")
    for i, s in enumerate(items):
        if not s or len(s) > MAX_STOP_CHARS:
            raise bad("stop", f"each stop string must be 1 to {MAX_STOP_CHARS} characters long")
        _text(s, "stop" if isinstance(stop, str) else f"stop[{i}]")
    return tuple(items)


def _messages(messages: Any, unknown: Unknown) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "messages must be a non-empty list of {role, content} objects")
    if len(messages) > MAX_MESSAGES:
        raise bad("messages", f"messages has {len(messages)} entries; at most {MAX_MESSAGES}")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, f"{where} must be an object with role and content")
        unknown(sorted(set(m) - {"role", "content", "name", "tool_calls", "tool_call_id", "refusal"}), where,
                "role, content, name, and tool_calls (assistant) or tool_call_id (tool)")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise bad(f"{where}.role", f"{where}.role must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
        message: dict[str, Any] = {"role": CHAT_ROLES[role]}
        if "name" in m and isinstance(m["name"], str):
            _text(m["name"], f"{where}.name")
        if role == "assistant" and m.get("tool_calls"):
            message["tool_calls"] = _tool_calls(m["tool_calls"], where)
            message["content"] = _content(m["content"], where) if m.get("content") is not None else ""
        else:
            message["content"] = _content(m.get("content"), where)
        if role == "tool":
            if not isinstance(m.get("tool_call_id"), str):
                raise bad(f"{where}.tool_call_id", f"{where}.tool_call_id must be the id of the call it answers")
            message["tool_call_id"] = _text(m["tool_call_id"], f"{where}.tool_call_id")
        if isinstance(m.get("name"), str) and role == "tool":
            message["name"] = m["name"]
        out.append(message)
    return out


def _tool_calls(calls: Any, where: str) -> list[dict]:
    """An assistant message's tool_calls: [{id, type: function, function: {name, arguments (a JSON string)}}]."""
    if not isinstance(calls, list):
        raise bad(f"{where}.tool_calls", f"{where}.tool_calls must be a list")
    out = []
    for j, c in enumerate(calls):
        f = c.get("function") if isinstance(c, dict) else None
        if not (isinstance(f, dict) and isinstance(f.get("name"), str) and isinstance(f.get("arguments"), str)):
            raise bad(f"{where}.tool_calls[{j}]", f"{where}.tool_calls[{j}] must be {{'id': ..., 'type': 'function', "
                      f"'function': {{'name': ..., 'arguments': '<JSON>'}}}}")
        _text(f["name"], f"{where}.tool_calls[{j}].function.name")
        _text(f["arguments"], f"{where}.tool_calls[{j}].function.arguments")
        out.append({"id": str(c.get("id", "")), "type": "function",
                    "function": {"name": f["name"], "arguments": f["arguments"]}})
    return out


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return _text(content, f"{where}.content")
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise bad(f"{where}.content[{j}]", f"{where}.content[{j}] must be a text part "
                          f"{{'type': 'text', 'text': ...}}; images, audio and files are not supported")
            parts.append(_text(part["text"], f"{where}.content[{j}].text"))
        return "".join(parts)
    raise bad(f"{where}.content", f"{where}.content must be a string or a list of text parts")


def _prompt(prompt: Any, vocab_size: int) -> str | list[int]:
    """A string or a list of token ids; a list of one of those is unwrapped (n=1)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise bad("prompt", "prompt is empty")
        return _text(prompt, "prompt")
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        if not all(0 <= t < vocab_size for t in prompt):
            raise bad("prompt", f"prompt token ids must be in [0, {vocab_size})")
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise bad("prompt", "send one prompt per request (a list of several prompts is not supported)")
    raise bad("prompt", "prompt must be a non-empty string or a non-empty list of token ids")


# -- responses -----------------------------------------------------------------------


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage_body(usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens, "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def completion_body(kind: str, rid: str, model: str, text: str | None, finish: str, usage,
                    tool_calls: list | None = None, reasoning: str | None = None) -> dict:
    """tool_calls: runtime.tools.ToolCall objects (chat only); with them, content may be None.
    reasoning: the reply's thinking, split off (chat only; llama-server's and vLLM's reasoning_content)."""
    created = int(time.time())
    if kind == "chat":
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        if tool_calls:
            message["tool_calls"] = [c.openai() for c in tool_calls]
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        return {"id": rid, "object": "chat.completion", "created": created, "model": model,
                "choices": [choice], "usage": usage_body(usage)}
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [choice], "usage": usage_body(usage)}


class ChunkWriter:
    """The SSE events of one streamed response (chat or completion)."""

    def __init__(self, kind: str, rid: str, model: str, include_usage: bool):
        self.kind, self.rid, self.model, self.include_usage = kind, rid, model, include_usage
        self.created = int(time.time())

    def _chunk(self, choices: list, usage: Any = None, last: bool = False) -> bytes:
        body = {"id": self.rid, "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self.model, "choices": choices}
        if self.include_usage:
            body["usage"] = usage
        return sse(body)

    def start(self) -> bytes | None:
        if self.kind != "chat":
            return None
        return self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}])

    def delta(self, text: str, finish: str | None = None) -> bytes:
        if self.kind == "chat":
            delta = {"content": text} if text else {}
            return self._chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])
        return self._chunk([{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}])

    def reasoning(self, text: str) -> bytes:
        """A delta of the reply's thinking (chat only)."""
        return self._chunk([{"index": 0, "delta": {"reasoning_content": text}, "logprobs": None,
                             "finish_reason": None}])

    def tool_calls(self, calls: list) -> list[bytes]:
        """Each call as OpenAI streams it: a chunk with its id and name, then chunks of its arguments."""
        out = []
        for i, c in enumerate(calls):
            head = {"index": i, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": ""}}
            out.append(self._chunk([{"index": 0, "delta": {"tool_calls": [head]}, "logprobs": None,
                                     "finish_reason": None}]))
            step = max(1, len(c.arguments) // 2 + 1)
            for k in range(0, len(c.arguments), step):
                piece = {"index": i, "function": {"arguments": c.arguments[k:k + step]}}
                out.append(self._chunk([{"index": 0, "delta": {"tool_calls": [piece]}, "logprobs": None,
                                         "finish_reason": None}]))
        return out

    def usage(self, usage) -> bytes | None:
        return self._chunk([], usage_body(usage)) if self.include_usage else None


def sse(body: dict) -> bytes:
    return b"data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"
