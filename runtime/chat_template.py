"""Render a model's own Jinja2 chat template, safely and within bounds.

A chat template ships inside a downloaded model, so it is untrusted code. It
renders with Hugging Face's conventions (variables `messages`,
`add_generation_prompt`, `bos_token`, `eos_token` plus any extras such as
`tools`; globals `raise_exception` and `strftime_now`; HF's `tojson`; the
`{% generation %}` tag; trim_blocks and lstrip_blocks) inside
`ImmutableSandboxedEnvironment`, which refuses attributes starting with "_",
known-mutating methods and callables marked unsafe. Here an unsafe attribute
is an error at once rather than a silent empty value, and there is no loader,
so `include`/`import`/`extends` cannot reach files.

The sandbox does not bound time or memory, so a render also runs under a
budget (`TemplateLimits`), checked:
- on every loop iteration: each `for` iterable is wrapped by rewriting the
  parsed template before it is compiled (so output-free loops are caught too);
- on every call (`call` is overridden), so recursive macros are caught;
- on every output chunk, whose total length is bounded;
- on the operations that can build a large string or number from a small
  template (`*`, `+`, `%`, `**`, `~`, the filters and str methods that pad,
  repeat, join or format): they are sized before they run, refused when the
  result would be too long, and charged to a per-render work budget.
Constant folding at compile time is disabled so nothing runs outside it.
"""

from __future__ import annotations

import contextvars
import functools
import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from jinja2 import TemplateError, TemplateSyntaxError, nodes, pass_context
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.visitor import NodeTransformer

from edge_infer.contract.errors import UserError


@dataclass(frozen=True)
class TemplateLimits:
    max_output_chars: int = 1_000_000  # also the largest single string or number-argument
    max_work_chars: int = 16_000_000  # characters built by string operations in one render
    max_seconds: float = 2.0  # wall time of one render
    max_source_chars: int = 1_000_000  # the template itself


class _Refused(Exception):
    """A render went over its budget."""


class _TemplateRaised(Exception):
    """The template called raise_exception(message)."""


class _Budget:
    """Time, output and work spent by one render."""

    def __init__(self, limits: TemplateLimits):
        self.limits = limits
        self.deadline = time.monotonic() + limits.max_seconds
        self.work = 0

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise _Refused(f"took longer than {self.limits.max_seconds:g} s to render")

    def check(self, size: int, what: str) -> None:
        """Refuse an operation whose result would be `size` characters long."""
        self.tick()
        if size > self.limits.max_output_chars:
            raise _Refused(f"{what} would build {size} characters (at most {self.limits.max_output_chars})")

    def charge(self, value: Any) -> Any:
        """Count a built value against the work budget; returns it."""
        if isinstance(value, (str, list, tuple)):
            self.work += len(value)
            if self.work > self.limits.max_work_chars:
                raise _Refused(f"built more than {self.limits.max_work_chars} characters of strings")
        return value


_BUDGET: contextvars.ContextVar[_Budget] = contextvars.ContextVar("chat_template_budget")


def _size(value: Any, limit: int) -> int:
    """Rough length of str(value); stops counting once past limit."""
    total, stack = 0, [value]
    while stack and total <= limit:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, (list, tuple, set, frozenset, dict)):
            total += 2 + 2 * len(v)  # brackets and separators: every element costs
            if total <= limit:
                stack.extend(v.items() if isinstance(v, dict) else v)
        elif isinstance(v, int):
            total += 1 + v.bit_length() // 3
        else:
            total += 8
    return total


def _format_size(fmt: str, values: Iterable[Any], limit: int) -> int:
    """Upper-ish bound on len(fmt % values) or fmt.format(*values): widths are digit runs."""
    values = list(values)
    widths = sum(int(d) for d in re.findall(r"\d{1,9}", fmt))
    if "*" in fmt or re.search(r"\{[^{}]*\{", fmt):  # widths taken from the arguments
        widths += sum(v for v in values if isinstance(v, int) and v > 0)
    return len(fmt) + widths + sum(_size(v, limit) for v in values)


def _check_numbers(values: Iterable[Any], budget: _Budget) -> None:
    """A number argument above the output limit can only be a width or count bomb."""
    limit = budget.limits.max_output_chars
    for v in values:
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > limit:
            raise _Refused(f"passed the number {v} to a function (at most {limit})")


class _SandboxEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"+", "*", "%", "**"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} object is unsafe")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _BUDGET.get()
        limit = budget.limits.max_output_chars
        ints = isinstance(left, int) and isinstance(right, int)
        if operator == "*" and ints:
            budget.check((left.bit_length() + right.bit_length()) // 3, "multiplying numbers")
        elif operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(n, int) and isinstance(seq, (str, list, tuple)):
                budget.check(_size(seq, limit) * max(n, 0), "repeating a string or list")
        elif operator == "**" and ints and right > 0 and abs(left) > 1:
            budget.check(left.bit_length() * right // 3, "raising to a power")
        elif operator == "+" and not ints:
            budget.check(_size(left, limit) + _size(right, limit), "concatenating")
        elif operator == "%" and isinstance(left, str):
            args = right if isinstance(right, tuple) else (right,)
            budget.check(_format_size(left, args, limit), "formatting a string")
        return budget.charge(super().call_binop(context, operator, left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        budget = _BUDGET.get()
        limit = budget.limits.max_output_chars
        budget.tick()
        # str methods that can build far more than their inputs (str.format is
        # wrapped by the sandbox; the wrapper keeps the bound method in __wrapped__).
        name = getattr(__obj, "__name__", "")
        owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
        formatting = isinstance(owner, str) and name in ("format", "format_map")
        if not formatting:  # numbers given to format are values, sized by _format_size
            _check_numbers([*args, *kwargs.values()], budget)
        if isinstance(owner, str):
            if formatting:
                values = [*args, *kwargs.values()]
                if name == "format_map" and args and isinstance(args[0], dict):
                    values = list(args[0].values())
                budget.check(_format_size(owner, values, limit), "formatting a string")
            elif name == "join" and args:
                items = list(args[0])
                args = (items, *args[1:])
                budget.check(sum(_size(x, limit) for x in items) + len(owner) * len(items), "joining")
            elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
                hits = owner.count(args[0]) if args[0] else len(owner) + 1
                budget.check(len(owner) + hits * len(args[1]), "replacing")
            elif name == "expandtabs":
                tab = args[0] if args else kwargs.get("tabsize", 8)
                budget.check(len(owner) + owner.count("\t") * max(int(tab), 0), "expanding tabs")
        return budget.charge(super().call(__context, __obj, *args, **kwargs))


def _guard_filter(name: str, func: Any) -> Any:
    """Wrap a filter with the budget checks; keeps its pass_context-style marker."""
    offset = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0

    @functools.wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        budget = _BUDGET.get()
        limit = budget.limits.max_output_chars
        value, rest = args[offset], [*args[offset + 1 :], *kwargs.values()]
        if name != "format":  # numbers given to format are values, sized by _format_size
            _check_numbers(rest, budget)
        if isinstance(value, (list, tuple, set, frozenset, dict)):
            budget.check(_size(value, limit), f"the filter {name!r} on a container")
        if name == "join":
            items = list(value)
            args = (*args[:offset], items, *args[offset + 1 :])
            sep = str(rest[0]) if rest else ""
            budget.check(sum(_size(x, limit) for x in items) + len(sep) * len(items), "joining")
        elif name == "replace" and isinstance(value, str) and len(rest) >= 2:
            old, new = str(rest[0]), str(rest[1])
            hits = value.count(old) if old else len(value) + 1
            budget.check(len(value) + hits * len(new), "replacing")
        elif name == "indent" and isinstance(value, str):
            width = rest[0] if rest else 4
            per_line = len(width) if isinstance(width, str) else int(width)
            budget.check(len(value) + (value.count("\n") + 1) * per_line, "indenting")
        elif name == "format" and isinstance(value, str):
            budget.check(_format_size(value, rest, limit), "formatting a string")
        budget.tick()
        return budget.charge(func(*args, **kwargs))

    return guarded


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """HF's tojson: plain json.dumps, no HTML escaping (unlike Jinja's own)."""
    too_wide = (isinstance(indent, str) and len(indent) > 16) or (isinstance(indent, int) and indent > 16)
    if too_wide:
        raise _Refused(f"asked tojson for an indent of {indent!r} (at most 16)")
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@pass_context
def _guarded_iterable(context: Any, iterable: Any) -> Any:
    """Every `for` loop iterates through this (see _GuardLoops)."""
    return _Ticking(iterable, _BUDGET.get())


class _Ticking:
    """An iterable that checks the deadline on each item; keeps len() for loop.length."""

    def __init__(self, iterable: Any, budget: _Budget):
        self.iterable, self.budget = iterable, budget

    def __iter__(self):
        for item in self.iterable:
            self.budget.tick()
            yield item

    def __len__(self) -> int:
        return len(self.iterable)


@pass_context
def _guarded_concat(context: Any, parts: list[Any]) -> str:
    """`a ~ b ~ c`, sized before it is built (see _GuardLoops)."""
    budget = _BUDGET.get()
    budget.check(sum(_size(p, budget.limits.max_output_chars) for p in parts), "concatenating with '~'")
    return budget.charge("".join(map(str, parts)))


_ITER_FILTER = "edge_infer_guarded_iterable"
_CONCAT_FILTER = "edge_infer_guarded_concat"


class _GuardLoops(NodeTransformer):
    """Rewrite the parsed template: `for x in y` -> `for x in y|guard`, `a ~ b` -> `[a, b]|concat`."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, _ITER_FILTER, [], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        parts = nodes.List(node.nodes, lineno=node.lineno)
        return nodes.Filter(parts, _CONCAT_FILTER, [], [], None, None, lineno=node.lineno)


class _GenerationTag(Extension):
    """HF's `{% generation %}...{% endgeneration %}` (assistant-mask marker): renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


@pass_context
def _finalize(context: Any, value: Any) -> Any:
    """Every `{{ ... }}` value passes here before str(): size it first."""
    budget = _BUDGET.get()
    budget.check(_size(value, budget.limits.max_output_chars), "printing a value")
    return value


def _raise_exception(message: Any) -> None:
    raise _TemplateRaised(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _make_environment() -> _SandboxEnvironment:
    env = _SandboxEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
        extensions=[loopcontrols, _GenerationTag],
        optimized=False,  # no constant folding: every operation runs under the budget
        finalize=_finalize,
    )
    env.globals.pop("lipsum", None)  # generates unbounded text; no chat template uses it
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    env.filters["tojson"] = _tojson
    env.filters = {name: _guard_filter(name, f) for name, f in env.filters.items()}
    env.filters[_ITER_FILTER] = _guarded_iterable
    env.filters[_CONCAT_FILTER] = _guarded_concat
    return env


class ChatTemplate:
    """A compiled chat template; `render(messages)` gives the prompt text."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", *,
                 limits: TemplateLimits = TemplateLimits()):
        if not isinstance(source, str) or not source:
            raise UserError("chat template is empty or not a string; check the tokenizer_config.json chat_template")
        if len(source) > limits.max_source_chars:
            raise UserError(f"chat template is {len(source)} characters long; at most {limits.max_source_chars}")
        self.source, self.bos_token, self.eos_token, self.limits = source, bos_token, eos_token, limits
        self._env = _make_environment()
        try:
            tree = _GuardLoops().visit(self._env.parse(source))
            tree.set_environment(self._env)
            self._template = self._env.from_string(tree)
        except TemplateSyntaxError as e:
            raise UserError(f"chat template has a syntax error on line {e.lineno}: {e.message}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
        """The prompt for `messages`; extra variables (tools, enable_thinking, ...) go to the template."""
        _validate_messages(messages)
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token, **extra,
                     "messages": messages, "add_generation_prompt": add_generation_prompt}
        budget = _Budget(self.limits)
        token = _BUDGET.set(budget)
        try:
            parts, length = [], 0
            for chunk in self._template.generate(variables):
                length += len(chunk)
                budget.check(length, "output")
                parts.append(chunk)
            return "".join(parts)
        except _TemplateRaised as e:
            raise UserError(f"chat template refused the messages: {e}") from None
        except _Refused as e:
            raise UserError(f"chat template {e}; it is not a usable chat template") from None
        except SecurityError as e:
            raise UserError(f"chat template tried an unsafe operation and was stopped: {e}") from None
        except RecursionError:
            raise UserError("chat template recursed too deeply") from None
        except TemplateError as e:
            raise UserError(f"chat template failed: {e}") from None
        except Exception as e:  # noqa: BLE001 -- untrusted template code: any failure is the template's
            raise UserError(f"chat template failed while rendering: {type(e).__name__}: {e}") from None
        finally:
            _BUDGET.reset(token)


def _validate_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise UserError("messages must be a non-empty list of {'role': ..., 'content': ...} objects, "
                        f"got {_short(messages)}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise UserError(f"messages[{i}] must be an object with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise UserError(f"messages[{i}].role must be a non-empty string such as 'user', got {_short(role)}")
        content = m.get("content")
        if content is None and role != "assistant":
            raise UserError(f"messages[{i}].content is missing; only an assistant message "
                            "(one that carries tool calls) may leave it out")
        if content is not None and not isinstance(content, str):
            raise UserError(f"messages[{i}].content must be a string, got {type(content).__name__}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


RESERVED_TEMPLATE_VARIABLES = frozenset({"messages", "add_generation_prompt", "bos_token", "eos_token"})


def check_template_kwargs(template_kwargs: Any) -> dict[str, Any]:
    """Variables for the chat template beside the messages: a mapping of names to JSON-like values."""
    if template_kwargs is None:
        return {}
    if not isinstance(template_kwargs, Mapping) or not all(isinstance(k, str) for k in template_kwargs):
        raise UserError("template_kwargs must be a mapping of variable names to values, e.g. "
                        "{'enable_thinking': False}")
    taken = sorted(RESERVED_TEMPLATE_VARIABLES & set(template_kwargs))
    if taken:
        raise UserError(f"template_kwargs cannot set {', '.join(taken)}: the prompt itself sets it")
    return dict(template_kwargs)
