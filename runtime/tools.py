"""Tool calling: tools in the prompt, a grammar for the call, the call parsed back out.

Two formats, chosen by the model's chat template:

  native   the template renders `tools` itself (its source uses the variable,
           as Qwen 2.5/3, Hermes, Llama 3.1+ and Mistral templates do). The
           tools go to the template as transformers passes them; the reply is
           parsed in the model's own syntax:
             <tool_call>{"name": ..., "arguments": {...}}</tool_call>  (Qwen, Hermes, SmolLM3)
             {"name": ..., "parameters": {...}}                        (Llama 3 JSON)
             [TOOL_CALLS] [{"name": ..., "arguments": {...}}]          (Mistral)
           With tool_choice "required" or a named function the reply is
           constrained to <tool_call> blocks. With "auto", when the
           vocabulary has <tool_call> as one token (Qwen, Hermes), the grammar
           is triggered lazily: free text until the model emits that token,
           then the call body is constrained up to </tool_call>, then free
           again (`TriggeredMatcher`); otherwise the reply is parsed as is.
  generic  any other template (the default model's among them): the tools are
           described in a system message and the reply is constrained to
           either one JSON object {"tool_calls": [{"name", "arguments"}, ...]}
           or plain text that does not start with "{" (as llama.cpp does for
           templates without tool support). Free text stays free: the grammar
           only decides at the first character.

In both, "required" and a named function constrain the arguments to the
function's JSON schema, so they always parse and validate. "none" leaves the
tools out of the prompt and the output unconstrained.

Reading the calls back out of a reply lives in runtime/tool_replies.py (re-exported here).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Sequence

from edge_infer.runtime.constrain import JSON_OPTIONS, Constraint, closed, json_schema_constraint, lark_constraint
from edge_infer.contract.errors import UserError
from edge_infer.runtime.tool_replies import (  # noqa: F401 (the reading half, re-exported)
    CallWatch, ToolCall, completed_calls, new_call_id, parse_reply, split_calls, until_repeat)

MAX_TOOLS = 128
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class Function:
    name: str
    description: str
    parameters: dict  # a JSON schema for the arguments object

    def openai(self) -> dict:
        """The OpenAI tool shape, which chat templates receive as `tools`."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolPlan:
    """How one request uses tools: the prompt changes, the grammar, how to read the reply."""

    functions: tuple[Function, ...]
    choice: str  # auto | none | required | the name of a function
    parallel: bool
    format: str  # native | generic
    constraint: Constraint | None

    @property
    def active(self) -> bool:
        return bool(self.functions) and self.choice != "none"


def output_constraint(plan: ToolPlan | None, constraint: Constraint | None,
                      given: str = "response_format") -> Constraint | None:
    """The one grammar a generation runs with: the request's own (`given`: response_format, grammar) or
    the one a constrained tool_choice (required, or a named function) brings; both at once are refused."""
    if plan is None or plan.constraint is None:
        return constraint
    if constraint is not None:
        raise UserError(_two_grammars(plan, given))
    return plan.constraint


def _two_grammars(plan: ToolPlan, given: str) -> str:
    """What conflicts when a request's own grammar meets the one its tools bring, and what to send instead."""
    if plan.choice == "auto":
        return (f"{given} cannot be combined with tools under tool_choice 'auto' for this model: the reply's "
                f"grammar already decides between a tool call and plain text. Send tool_choice 'none' to get "
                f"{given} (the tools are then left out), or leave out {given} to let the model call a tool")
    if plan.choice == "required":
        sent, what = "tool_choice 'required'", "calls to the tools"
    else:
        sent, what = f"tool_choice naming function {plan.choice!r}", f"one call to {plan.choice!r}"
    return (f"{given} cannot be combined with {sent}, which constrains the reply to {what}. Leave out {given} "
            f"to get the call (its arguments already follow the function's schema), or send tool_choice 'none' "
            f"to get {given}")


def parse_tools(tools: Any) -> tuple[Function, ...]:
    """OpenAI `tools` ([{"type": "function", "function": {name, description?, parameters?}}]) -> Functions."""
    if tools is None:
        return ()
    if not isinstance(tools, list):
        raise UserError("tools must be a list of {'type': 'function', 'function': {...}} objects")
    if len(tools) > MAX_TOOLS:
        raise UserError(f"tools has {len(tools)} entries; at most {MAX_TOOLS}")
    out, seen = [], set()
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise UserError(f"{where} must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}")
        f = t["function"]
        extra = set(f) - {"name", "description", "parameters", "strict"}
        if extra:
            raise UserError(f"{where}.function has unknown field(s) {', '.join(sorted(extra))}")
        name = f.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise UserError(f"{where}.function.name must be 1-64 letters, digits, '_', '.' or '-', got {name!r}")
        if name in seen:
            raise UserError(f"{where}.function.name {name!r} is used twice")
        seen.add(name)
        description = f.get("description", "")
        if not isinstance(description, str):
            raise UserError(f"{where}.function.description must be a string")
        params = f.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise UserError(f"{where}.function.parameters must be a JSON schema object")
        out.append(Function(name, description, params))
    return tuple(out)


def parse_tool_choice(choice: Any, functions: Sequence[Function]) -> str:
    """auto | none | required | a function name, from OpenAI's tool_choice."""
    if choice is None:
        return "auto" if functions else "none"
    if choice in ("auto", "none", "required"):
        if choice == "required" and not functions:
            raise UserError("tool_choice 'required' needs tools")
        return choice
    if (isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict)
            and isinstance(choice["function"].get("name"), str)):
        name = choice["function"]["name"]
        if name not in {f.name for f in functions}:
            raise UserError(f"tool_choice names function {name!r}, which is not in tools")
        return name
    raise UserError("tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'function': {'name': ...}}")


def template_renders_tools(template) -> bool:
    return template is not None and re.search(r"\btools\b", template.source) is not None


def plan_tools(functions: Sequence[Function], choice: str, parallel: bool, template, tokenizer=None) -> ToolPlan:
    """Decide the format and build (and check) the grammar, before any decoding."""
    fmt = "native" if template_renders_tools(template) else "generic"
    plan = ToolPlan(tuple(functions), choice, parallel, fmt, None)
    if not plan.active:
        return plan
    chosen = [f for f in functions if choice in ("auto", "required") or f.name == choice]
    # A named function is called once, as OpenAI's API does: its list holds one call, whatever `parallel` says.
    parallel = parallel and choice in ("auto", "required")
    trigger = None
    if fmt == "native" and choice == "auto" and tokenizer is not None:
        ids = tokenizer.tokenize_str("<tool_call>", parse_special=True)
        trigger = ids[0] if len(ids) == 1 else None  # a single (special) token: a clean place to switch on
    try:
        constraint = _constraint(chosen, choice, parallel, fmt, tokenizer, trigger)
    except UserError as e:
        raise UserError(f"tools: {e}") from None
    return ToolPlan(plan.functions, choice, parallel, fmt, constraint)


def _call_schema(functions: Sequence[Function]) -> dict:
    """One call {"name": <a function>, "arguments": <its parameters, closed>}."""
    options = [{"type": "object", "properties": {"name": {"const": f.name}, "arguments": closed(f.parameters)},
                "required": ["name", "arguments"], "additionalProperties": False} for f in functions]
    return options[0] if len(options) == 1 else {"anyOf": options}


def _calls_schema(functions: Sequence[Function], parallel: bool) -> dict:
    items = {"type": "array", "items": _call_schema(functions), "minItems": 1}
    if not parallel:
        items["maxItems"] = 1
    return {"type": "object", "properties": {"tool_calls": items}, "required": ["tool_calls"],
            "additionalProperties": False}


def _constraint(functions: Sequence[Function], choice: str, parallel: bool, fmt: str, tokenizer,
                trigger: int | None = None) -> Constraint | None:
    if fmt == "generic":
        schema = _calls_schema(functions, parallel)
        if choice != "auto":
            return json_schema_constraint(schema, tokenizer)
        # Either the calls object or text that does not start with "{" (nor with whitespace).
        lark = f"start: calls | TEXT\ncalls: %json {json.dumps(_json_style(schema))}\nTEXT: /[^{{\\s](?s:.*)/\n"
        return lark_constraint(lark, tokenizer)
    call = json.dumps(_json_style(_call_schema(functions)))
    if choice == "auto":
        if trigger is None:
            return None  # the model's own syntax, parsed afterwards
        # The body of one call, after the <tool_call> token (TriggeredMatcher runs it lazily).
        body = lark_constraint(f'start: "\\n"? %json {call} "\\n"? "</tool_call>"\n', tokenizer)
        return Constraint("tool_call", body.grammar, trigger=trigger)
    repeat = "+" if parallel else ""
    lark = f'start: call{repeat}\ncall: "<tool_call>\\n" %json {call} "\\n</tool_call>\\n"\n'
    return lark_constraint(lark, tokenizer)


class TriggeredMatcher:
    """A grammar that switches on at a trigger token and off again when it completes.

    Before the trigger (and after each completed call) every token is allowed; from the token after
    the trigger, the inner GrammarMatcher masks and consumes. It never finishes by itself (the
    reply goes on, or ends with eos), so parallel calls are several triggered blocks. Speculation
    (runtime.constrain.constrain_guesses) only runs on it while it is active, cut at the end.
    """

    def __init__(self, inner, trigger: int):
        self.inner, self.trigger = inner, trigger
        self.vocab, self.eos, self.bitmask = inner.vocab, inner.eos, inner.bitmask
        self.active = False

    @property
    def raw(self):
        return self.inner.raw

    def fill(self, bitmask=None, index: int = 0) -> None:
        if self.active:
            self.inner.fill(bitmask, index)
        else:
            (self.bitmask if bitmask is None else bitmask)[index].fill(-1)

    def mask(self, logits, bitmask_row=None):
        return self.inner.mask(logits, bitmask_row) if self.active else logits

    def accept(self, token: int) -> None:
        if not self.active:
            self.active = token == self.trigger
            return
        self.inner.accept(token)
        if self.inner.finished:  # the call is complete: free text (or another call) may follow
            self.inner.raw.reset()
            self.active = False

    def validate(self, tokens: list[int]) -> int:
        """Guesses up to (and including) the trigger while inactive; the inner grammar's while active."""
        if not self.active:
            return next((i + 1 for i, t in enumerate(tokens) if t == self.trigger), len(tokens))
        return self.inner.validate(tokens)

    def forced(self) -> list[int]:
        return self.inner.forced() if self.active else []

    def rollback(self, n: int) -> None:
        if self.active:
            self.inner.rollback(n)

    @property
    def finished(self) -> bool:
        return False

    @property
    def accepting(self) -> bool:
        return not self.active


def _json_style(schema: dict) -> dict:
    """JSON embedded in a Lark grammar written like response_format's (no free whitespace)."""
    return {**schema, "x-guidance": JSON_OPTIONS}


def tool_messages(messages: list[dict], plan: ToolPlan) -> tuple[list[dict], dict]:
    """The messages to render and extra template variables, for this plan.

    History: assistant messages with `tool_calls` and `tool` messages go to a native template as
    transformers passes them (arguments as objects); for the generic format they become text in
    the same JSON shape the model is asked to write.
    """
    if plan.format == "native":
        out = [_native_message(m) for m in messages]
        return out, ({"tools": [f.openai() for f in plan.functions]} if plan.active else {})
    out = [_generic_message(m) for m in messages]
    if plan.active:
        system = _generic_system(plan)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + system}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out, {}


def _arguments_object(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def _native_message(m: dict) -> dict:
    if m.get("tool_calls"):
        calls = [{"type": "function", "id": c.get("id"),
                  "function": {"name": c["function"]["name"],
                               "arguments": _arguments_object(c["function"].get("arguments", "{}"))}}
                 for c in m["tool_calls"]]
        return {"role": "assistant", "content": m.get("content") or "", "tool_calls": calls}
    return m


def _generic_message(m: dict) -> dict:
    if m.get("tool_calls"):
        calls = [{"name": c["function"]["name"], "arguments": _arguments_object(c["function"].get("arguments", "{}"))}
                 for c in m["tool_calls"]]
        text = json.dumps({"tool_calls": calls}, ensure_ascii=False)
        return {"role": "assistant", "content": ((m.get("content") or "") + "\n" + text).strip()}
    if m.get("role") == "tool":
        ref = m.get("name") or m.get("tool_call_id") or "tool"
        return {"role": "user", "content": f"[result of {ref}]\n{m.get('content', '')}"}
    return {k: v for k, v in m.items() if k in ("role", "content")}


def _generic_system(plan: ToolPlan) -> str:
    tools = "\n".join(json.dumps({"name": f.name, "description": f.description, "parameters": f.parameters},
                                 ensure_ascii=False) for f in plan.functions)
    many = "one or more calls" if plan.parallel else "exactly one call"
    if plan.choice == "auto":
        how = ("To call a tool, reply with only a JSON object of this form and nothing else:\n"
               '{"tool_calls": [{"name": "<tool name>", "arguments": {<arguments>}}]}\n'
               f"with {many}. Otherwise reply in plain text.")
    else:
        only = f' The tool to call is "{plan.choice}".' if plan.choice != "required" else ""
        how = ("Reply with only a JSON object of this form:\n"
               '{"tool_calls": [{"name": "<tool name>", "arguments": {<arguments>}}]}\n'
               f"with {many}.{only}")
    return f"You can call these tools:\n{tools}\n{how}"


def tool_prompt(model, prompt: Any, tools: Any, tool_choice: Any = None,
                parallel_tool_calls: bool = True, template_kwargs: Any = None) -> tuple[list[int], ToolPlan]:
    """Prompt ids with the tools rendered in, and the plan, for chat messages `prompt` and OpenAI `tools`."""
    from edge_infer.runtime.constrain import grammar_tokenizer
    from edge_infer.runtime.chat_template import check_template_kwargs

    if not (isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt)):
        raise UserError("tools need a chat prompt: a list of {'role', 'content'} messages")
    if model.chat_template is None:
        raise UserError("tools need a model with a chat template")
    functions = parse_tools(tools)
    choice = parse_tool_choice(tool_choice, functions)
    plan = plan_tools(functions, choice, bool(parallel_tool_calls), model.chat_template, grammar_tokenizer(model))
    messages, extra = tool_messages(prompt, plan)
    text = model.chat_template.render(messages, add_generation_prompt=True, **check_template_kwargs(template_kwargs),
                                      **extra)
    return model.tokenizer.encode(text, add_special_tokens=False), plan
