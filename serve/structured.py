"""Structured output and tool calls on the HTTP side: request -> (prompt ids, grammar, tool plan), and the
reply's text -> content and tool calls, streamed or whole. The grammar itself runs in the engine (one
matcher per sequence); the formats live in runtime/constrain.py and runtime/tools.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge_infer.runtime.constrain import Constraint, constraint_from
from edge_infer.contract.errors import TokenizerError, UserError
from edge_infer.runtime.generate import encode_prompt
from edge_infer.runtime.tools import ToolCall, ToolPlan, output_constraint, split_calls, tool_prompt
from edge_infer.serve.protocol import bad


@dataclass(frozen=True)
class Prepared:
    ids: list[int]
    constraint: Constraint | None
    plan: ToolPlan | None  # None: no tools in this request


def prepare(model, prompt, *, kind: str, response_format=None, tools=None, tool_choice=None,
            parallel_tool_calls: bool = True, template_kwargs=None) -> Prepared:
    """Tokenize and compile; every problem is a 400 naming its field, before the engine sees the request."""
    field = "messages" if kind == "chat" else "prompt"
    try:
        constraint = constraint_from(response_format, model=model)
    except UserError as e:
        raise bad("response_format", str(e)) from None
    plan = None
    if tools:
        try:
            ids, plan = tool_prompt(model, prompt, tools, tool_choice, parallel_tool_calls, template_kwargs)
        except TokenizerError:
            raise  # the model's own file is at fault: a 5xx, answered by the app
        except UserError as e:
            param = ("chat_template_kwargs" if "template_kwargs" in str(e) else "tool_choice" if "tool_choice" in str(e)
                     else "tools" if "tools" in str(e) else field)
            raise bad(param, str(e)) from None
        try:
            constraint = output_constraint(plan, constraint)
        except UserError as e:
            raise bad("response_format", str(e)) from None
    else:
        if tool_choice not in (None, "none", "auto"):
            raise bad("tool_choice", "tool_choice needs tools")
        try:
            ids = encode_prompt(model, prompt, template_kwargs if kind == "chat" else None)
        except TokenizerError:
            raise
        except UserError as e:
            raise bad("chat_template_kwargs" if "template_kwargs" in str(e) else field, str(e)) from None
    return Prepared(ids, constraint, plan)


def split_reply(text: str, finish: str, plan: ToolPlan | None) -> tuple[str | None, list[ToolCall], str]:
    """(content, tool calls, finish reason) of a whole reply (runtime.tools.split_calls: calls completed
    before a cut or a repeated call are kept)."""
    return split_calls(text, finish, plan)


class ReplyStream:
    """Text deltas of a reply that may be tool calls: held back until they cannot be part of a call.

    Generic format: the first non-space character decides ("{" starts the calls object, anything
    else is plain text and streams from there). Native formats: held to the end, then parsed.
    """

    def __init__(self, plan: ToolPlan | None):
        self.plan = plan if plan is not None and plan.active else None
        self.held: list[str] = []
        self.passing = self.plan is None

    def feed(self, text: str) -> str:
        if self.passing:
            return text
        self.held.append(text)
        start = "".join(self.held).lstrip()
        if self.plan is not None and self.plan.format == "generic" and start and not start.startswith("{"):
            self.passing = True
            out, self.held = "".join(self.held), []
            return out
        return ""

    def finish(self, finish: str) -> tuple[str, list[ToolCall], str]:
        """(text still to send, tool calls, finish reason)."""
        text, self.held = "".join(self.held), []
        if self.passing or self.plan is None:
            return text, [], finish
        content, calls, reason = split_reply(text, finish, self.plan)
        return (content or "") if calls else text, calls, reason
