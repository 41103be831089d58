"""Reading tool calls back out of a reply: whole replies, replies cut by max_tokens, and replies as they
stream (CallWatch ends a reply that repeats a call). The formats are described in runtime/tools.py, which
plans the prompt and grammar; this module only parses."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge_infer.runtime.tools import ToolPlan

@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text (the OpenAI wire form)

    def openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def parse_reply(text: str, plan: ToolPlan) -> tuple[str | None, list[ToolCall]]:
    """(content, tool calls) from a complete reply. Text that holds no call is all content; a call
    identical to an earlier one ends the list."""
    if not plan.active:
        return text, []
    raw = _generic_calls(text) if plan.format == "generic" else _native_calls(text)
    if raw is None:
        return text, []
    content, calls = raw
    out = _tool_calls(until_repeat(calls), plan)
    if out is None:
        return text, []  # not a call to one of the tools: leave the text as it is
    return (content or None), out


def _tool_calls(calls: list, plan: ToolPlan) -> list[ToolCall] | None:
    names = {f.name for f in plan.functions}
    out = []
    for c in calls:
        if not isinstance(c, dict) or c.get("name") not in names:
            return None
        args = c.get("arguments", c.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                return None
        out.append(ToolCall(new_call_id(), c["name"], json.dumps(args, ensure_ascii=False)))
    return out


def _call_key(call: Any) -> str:
    return json.dumps(call, sort_keys=True, ensure_ascii=False) if isinstance(call, dict) else repr(call)


def until_repeat(calls: list) -> list:
    """The calls before the first one identical to an earlier one (a model looping on one call)."""
    seen: set[str] = set()
    for i, call in enumerate(calls):
        key = _call_key(call)
        if key in seen:
            return calls[:i]
        seen.add(key)
    return calls


_GENERIC_HEAD = re.compile(r'\s*\{\s*"tool_calls"\s*:\s*\[')
_CLOSED_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def completed_calls(text: str, plan: ToolPlan) -> tuple[str, list]:
    """(text before the calls, the calls complete so far) of a reply that may be unfinished: cut by
    max_tokens inside a list of calls, or ended at a repeated call."""
    if plan.format == "generic":
        head = _GENERIC_HEAD.match(text)
        return ("", _objects(text, head.end())) if head else (text, [])
    if "<tool_call>" in text:
        return text[:text.index("<tool_call>")].strip(), _json_bodies(_CLOSED_CALL, text)[0]
    if "[TOOL_CALLS]" in text:
        before, _, after = text.partition("[TOOL_CALLS]")
        start = after.find("[")
        return before.strip(), (_objects(after, start + 1) if start >= 0 else [])
    return text, []


def _objects(text: str, i: int) -> list:
    """The whole JSON values of a list that starts at text[i] (after its "["), up to the first unfinished one."""
    decoder = json.JSONDecoder()
    out: list[Any] = []
    while True:
        while i < len(text) and text[i] in " \t\n\r,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return out
        try:
            value, i = decoder.raw_decode(text, i)
        except ValueError:
            return out
        out.append(value)


def split_calls(text: str, finish: str, plan: ToolPlan | None) -> tuple[str | None, list[ToolCall], str]:
    """(content, tool calls, finish reason) of a whole reply. A reply that ended ("stop") or was cut
    ("length") inside a list of calls still returns the calls completed in it: finish "tool_calls"
    when it ended, "length" when cut."""
    if plan is None or not plan.active or finish not in ("stop", "length"):
        return text, [], finish
    if finish == "stop":
        content, calls = parse_reply(text, plan)
        if calls:
            return content, calls, "tool_calls"
    before, raw = completed_calls(text, plan)
    found = _tool_calls(until_repeat(raw), plan) if raw else None
    if not found:
        return text, [], finish
    return (before or None), found, ("tool_calls" if finish == "stop" else "length")


class CallWatch:
    """Reads a reply as it streams; `feed` says when the call just completed repeats an earlier one
    (the reply should end there: a small model loops on one call while the grammar allows more)."""

    def __init__(self, plan: ToolPlan):
        self.plan, self.text, self.seen = plan, "", 0

    @staticmethod
    def wanted(plan: ToolPlan | None) -> bool:
        """Only a list that may hold several calls can repeat one."""
        return plan is not None and plan.active and plan.parallel and plan.choice in ("auto", "required")

    def feed(self, delta: str) -> bool:
        self.text += delta
        if "}" not in delta and ">" not in delta:
            return False  # no call can have completed
        _, calls = completed_calls(self.text, self.plan)
        if len(calls) == self.seen:
            return False
        self.seen = len(calls)
        return len(until_repeat(calls)) < len(calls)


def _generic_calls(text: str):
    s = text.strip()
    if not s.startswith("{"):
        return None
    try:
        obj = json.loads(s)
    except ValueError:
        return None
    if isinstance(obj, dict) and isinstance(obj.get("tool_calls"), list) and obj["tool_calls"]:
        return "", obj["tool_calls"]
    return None


_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def _json_bodies(pattern: re.Pattern, text: str) -> tuple[list, bool]:
    """The JSON bodies `pattern` finds in `text`, up to the first that does not parse; and whether all did."""
    calls = []
    for body in pattern.findall(text):
        try:
            calls.append(json.loads(body))
        except ValueError:
            return calls, False
    return calls, True


def _native_calls(text: str):
    if "<tool_call>" in text:
        calls, whole = _json_bodies(_HERMES, text)
        return (_HERMES.sub("", text).strip(), calls) if whole else None
    if "[TOOL_CALLS]" in text:
        head, _, body = text.partition("[TOOL_CALLS]")
        try:
            calls = json.loads(body.strip())
        except ValueError:
            return None
        return head.strip(), calls if isinstance(calls, list) else [calls]
    s = text.strip()
    if s.startswith("{") and ('"parameters"' in s or '"arguments"' in s):  # Llama 3's JSON form
        try:
            obj = json.loads(s)
        except ValueError:
            return None
        return "", [obj]
    return None
