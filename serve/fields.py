"""Request fields outside the API a route speaks: the extras other servers' clients send, and unknown ones.

Clients written for llama-server or Ollama send fields the OpenAI API lacks.
Those that map onto a feature of ours are translated before the body is
checked (`llama_and_ollama_extras`): `n_predict` and Ollama's
`options.num_predict` are max_tokens, `options.temperature` / `top_p` /
`top_k` / `seed` / `stop` / `min_p` / `repeat_penalty` the sampling fields,
`format: "json"` a JSON response_format, `think` the template's
`enable_thinking`, vLLM's `guided_regex` a regex response_format; `cache_prompt` (our prefix cache is
always on) is accepted, and `keep_alive` (Ollama's: seconds, or a duration such as
"5m"; 0 unloads the model after the reply, negative never; `request_keep_alive`) sets how
long a server of several models keeps the model after this request, in place of its
--keep-alive (a one-model server ignores it, and logs that once). Any other unknown field is ignored, logged once
per name and counted in `edge_infer_ignored_fields` (vLLM relaxed its parsing
the same way); `serve --strict` answers them with a 400 naming the field, as
the OpenAI API does.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from typing import Any, Callable

from edge_infer.serve.protocol import bad, refuse_unknown

log = logging.getLogger("edge_infer.serve")

MAX_NAMES = 64  # distinct field names logged and labelled; beyond them a scan counts as "other"
ACCEPTED = frozenset({"cache_prompt", "keep_alive"})  # honoured by what the server always does
_OPTIONS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "seed", "stop": "stop",
            "min_p": "min_p", "repeat_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
            "frequency_penalty": "frequency_penalty", "num_predict": "max_tokens"}


class UnknownFields:
    """What a route does with fields it does not know: refuse (strict) or ignore, log once, count."""

    def __init__(self, strict: bool = False, count: Callable[[str], None] | None = None):
        self.strict = strict
        self.count = count
        self.seen: set[str] = set()
        self.lock = threading.Lock()

    def found(self, names: list[str], where: str, honoured: str) -> None:
        """`names`: the unknown fields of one object (`where`: 'the request', 'messages[0]', ...)."""
        if not names:
            return
        if self.strict:
            refuse_unknown(names, where, honoured)
        for name in names:
            self._ignore(name[:64], where)

    def ignored(self, name: str, why: str) -> None:
        """A known field this server does not act on: logged once (saying `why`) and counted."""
        self._ignore(name, why=why)

    def _ignore(self, name: str, where: str = "", why: str = "") -> None:
        with self.lock:
            first = name not in self.seen and len(self.seen) < MAX_NAMES
            if first:
                self.seen.add(name)
            label = name if name in self.seen else "other"
        if first and why:
            log.warning("ignoring the request field %r: %s", name, why)
        elif first:
            log.warning("ignoring the unknown request field %r (in %s; serve --strict refuses it)", name, where)
        if self.count is not None:
            self.count(label)


LENIENT = UnknownFields()


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_seconds(value: Any) -> float:
    """Ollama's keep_alive in seconds: a number of seconds, or a duration ("5m", "1h30m", "90s",
    "300ms"; a number in a string is seconds); 0 unloads after the reply, any negative value never
    (returned as -1). Anything else is a 400 naming the field."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        seconds = _duration(value.strip())
    else:
        seconds = math.nan
    if not math.isfinite(seconds):
        raise bad("keep_alive", f"keep_alive must be seconds (300) or a duration such as '5m', '1h30m' or '90s'; "
                  f"0 unloads the model after the reply, -1 keeps it loaded; got {value!r:.40}")
    return -1.0 if seconds < 0 else seconds


def _duration(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    sign, body = (-1.0, text[1:]) if text[:1] == "-" else (1.0, text.lstrip("+"))
    parts = _DURATION.findall(body)
    if not parts or "".join(n + u for n, u in parts) != body:
        return math.nan
    return sign * sum(float(n) * _UNITS[u] for n, u in parts)


def request_keep_alive(body: dict) -> float | None:
    """The request's keep_alive in seconds (None: it sent none)."""
    value = body.get("keep_alive")
    return None if value is None else keep_alive_seconds(value)


def llama_and_ollama_extras(body: dict, fields: UnknownFields) -> dict:
    """`body` with llama-server's and Ollama's extras moved onto the OpenAI fields they mean (fields the
    request also gives directly win); under --strict the body is left as it is."""
    if fields.strict:
        return body
    out = {k: v for k, v in body.items() if k not in ACCEPTED}
    n_predict = out.pop("n_predict", None)
    if n_predict is not None and out.get("max_tokens") is None:
        out["max_tokens"] = None if n_predict == -1 else n_predict  # -1: until the context ends
    if "repeat_penalty" in out:
        out.setdefault("repetition_penalty", out.pop("repeat_penalty"))
    if out.get("format") == "json":
        out.pop("format")
        out.setdefault("response_format", {"type": "json_object"})
    think = out.pop("think", None)  # Ollama's thinking switch: the template's enable_thinking
    if isinstance(think, bool):
        kwargs = out.get("chat_template_kwargs")
        out["chat_template_kwargs"] = {"enable_thinking": think, **(kwargs if isinstance(kwargs, dict) else {})}
    elif think is not None:
        raise bad("think", f"think must be true or false, got {think!r:.40}")
    if "guided_regex" in out:  # vLLM's: the reply matches this regular expression
        out.setdefault("response_format", {"type": "regex", "regex": out.pop("guided_regex")})
    options = out.pop("options", None)
    if options is not None:
        if not isinstance(options, dict):
            raise bad("options", "options must be an object (Ollama's: temperature, top_p, num_predict, ...)")
        for key, value in options.items():
            if key in _OPTIONS:
                if _OPTIONS[key] == "max_tokens" and value == -1:
                    continue
                out.setdefault(_OPTIONS[key], value)
            else:
                fields.found([key], "options", ", ".join(sorted(_OPTIONS)))
    return out
