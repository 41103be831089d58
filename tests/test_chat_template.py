"""ChatTemplate: HF-compatible rendering, and untrusted templates stay contained."""

from __future__ import annotations

import json
import tracemalloc

import jinja2
import pytest

from edge_infer.runtime import chat_template
from edge_infer.runtime.chat_template import ChatTemplate, TemplateLimits
from edge_infer.contract.errors import UserError

SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Written in the style of Qwen2.5 / Llama 3 templates: tools through tojson,
# namespace(), loop controls, whitespace control, raise_exception.
TOOLS_TEMPLATE = """\
{{- bos_token }}
{%- if tools %}
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
{%- endif %}
{%- set ns = namespace(turns=0) %}
{%- for message in messages %}
    {%- if message.role not in ['system', 'user', 'assistant', 'tool'] %}
        {{- raise_exception('Unknown role: ' ~ message.role) }}
    {%- endif %}
    {%- if message.role == 'assistant' and message.tool_calls is defined %}
<|assistant|>{% for call in message.tool_calls %}<call>{{ call.function | tojson }}</call>{% endfor %}{{ eos_token }}
    {%- else %}
<|{{ message.role }}|>{{ message.content | trim }}{{ eos_token if message.role == 'assistant' }}
    {%- endif %}
    {%- set ns.turns = ns.turns + 1 %}
{%- endfor %}
{%- if add_generation_prompt %}
<|assistant|>
{%- endif %}
<!-- {{ ns.turns }} turns -->"""

USER = [{"role": "user", "content": "Hi"}]
FAST = TemplateLimits(max_seconds=0.3)


class TickClock:
    """A monotonic clock that advances `step` seconds each time it is read: the render's time bound
    then fires after a fixed number of checks, however loaded the machine is."""

    def __init__(self, step: float):
        self.step, self.now, self.reads = step, 0.0, 0

    def monotonic(self) -> float:
        self.reads += 1
        self.now += self.step
        return self.now


@pytest.fixture(autouse=True)
def clock(monkeypatch) -> TickClock:
    """Every render in this file runs on a clock of about 1 ms per deadline check (FAST: ~300 checks)."""
    tick = TickClock(1 / 1024)  # exact in binary, so the sums do not drift
    monkeypatch.setattr(chat_template, "time", tick)
    return tick


def render(source: str, messages=USER, limits: TemplateLimits = FAST, **kw) -> str:
    return ChatTemplate(source, limits=limits).render(messages, **kw)


# -- real templates ---------------------------------------------------------


def test_smollm2_chatml_renders_exactly():
    t = ChatTemplate(SMOLLM2)
    assert t.render(USER) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    convo = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Thanks"},
    ]
    assert t.render(convo, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nThanks<|im_end|>\n"
    )


def test_tools_template_with_tojson_namespace_and_tool_calls():
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"city": "<str>"}}}]
    messages = [
        {"role": "user", "content": "  Weather in Zürich?  "},
        {"role": "assistant", "content": None,
         "tool_calls": [{"function": {"name": "weather", "arguments": {"city": "Zürich"}}}]},
        {"role": "tool", "content": "12°C"},
    ]
    out = ChatTemplate(TOOLS_TEMPLATE, bos_token="<s>", eos_token="</s>").render(messages, tools=tools)
    assert out == (  # every `{%-` eats the newline before it
        '<s><tools>{"type": "function", "function": {"name": "weather", "parameters": {"city": "<str>"}}}</tools>'
        "<|user|>Weather in Zürich?"
        '<|assistant|><call>{"name": "weather", "arguments": {"city": "Zürich"}}</call></s>'
        "<|tool|>12°C<|assistant|><!-- 3 turns -->"
    )
    assert out == reference_render(TOOLS_TEMPLATE, messages, tools=tools, bos_token="<s>", eos_token="</s>")


def reference_render(source: str, messages, add_generation_prompt=True, **kw) -> str:
    """The same template through a plain, unguarded Jinja2 environment set up as HF does."""
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    kw = {"bos_token": "", "eos_token": "", **kw}
    return env.from_string(source).render(messages=messages, add_generation_prompt=add_generation_prompt, **kw)


CONVO = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+2? é 😀 中"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "  Thanks\n"},
]


@pytest.mark.parametrize("source", [SMOLLM2, TOOLS_TEMPLATE, "{% for m in messages %}{{ m.role ~ ':' ~ m.content }}"
                                    "{% if not loop.last %}|{% endif %}{% endfor %}{{ '%s-%d' % ('n', messages|length) }}"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_like_plain_jinja(source, add_generation_prompt):
    """The guards (loop and '~' rewriting, sized operations) change no output."""
    got = ChatTemplate(source, "<s>", "</s>").render(CONVO, add_generation_prompt)
    assert got == reference_render(source, CONVO, add_generation_prompt, bos_token="<s>", eos_token="</s>")


def test_hf_conventions():
    assert render("{{ bos_token }}|{{ eos_token }}") == "|"
    assert ChatTemplate("{{ bos_token }}{{ eos_token }}", "<s>", "</s>").render(USER) == "<s></s>"
    assert render("{{ enable_thinking }}", enable_thinking=False) == "False"
    assert render("{{ add_generation_prompt }}", add_generation_prompt=False) == "False"
    assert render("{{ {'k': '<&>é'} | tojson }}") == '{"k": "<&>é"}'  # no HTML escaping, no \\u
    assert render("{{ [1, 2] | tojson(indent=2) }}") == "[\n  1,\n  2\n]"
    assert render("{{ strftime_now('%Y') | int > 2000 }}") == "True"
    # big numbers as values are fine; only widths and counts are bounded
    assert render("{{ '{}-{:>5}'.format(1700000000, 'x') }}|{{ '%d' | format(1700000000) }}") == "1700000000-    x|1700000000"
    assert render("{{ '%s' % 1700000000 }}") == "1700000000"
    assert render("{% for i in range(5) %}{% if i == 3 %}{% break %}{% endif %}{{ i }}{% endfor %}") == "012"
    assert render("{% generation %}ok{% endgeneration %}") == "ok"
    # trim_blocks and lstrip_blocks, as HF sets them
    assert render("  {% if true %}\nA\n  {% endif %}\nB") == "A\nB"
    assert render("{% for m in messages %}{{ loop.index }}/{{ loop.length }}{% endfor %}") == "1/1"


def test_raise_exception_surfaces_the_template_message():
    src = "{% if messages[0].role != 'system' %}{{ raise_exception('System message must come first') }}{% endif %}"
    with pytest.raises(UserError, match="chat template refused the messages: System message must come first"):
        render(src)
    with pytest.raises(UserError, match="Unknown role: robot"):
        ChatTemplate(TOOLS_TEMPLATE).render([{"role": "robot", "content": "x"}])


def test_syntax_error_is_a_user_error_with_line():
    with pytest.raises(UserError, match="syntax error on line 2"):
        ChatTemplate("ok\n{% for x in %}")
    with pytest.raises(UserError, match="syntax error"):
        ChatTemplate("{{ x | no_such_filter }}")
    with pytest.raises(UserError, match="empty"):
        ChatTemplate("")


# -- malicious templates ----------------------------------------------------

ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ().__class__.__base__.__subclasses__() }}",
    "{{ self._TemplateReference__context }}",
    "{{ self.__init__.__globals__ }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ joiner.__init__.__globals__['os'] }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ config.items() }}",
    "{{ config.__class__.__init__.__globals__['os'] }}",
    "{{ request.application.__globals__ }}",
    "{{ messages.append({'role': 'system'}) }}",
    "{{ messages[0].update(role='system') }}",
    "{{ raise_exception.__globals__ }}",
    "{{ strftime_now.__globals__['datetime'] }}",
    "{% include '/etc/passwd' %}",
    "{% import 'os' as os %}{{ os.system('id') }}",
    "{% extends '/etc/hosts' %}",
    "{{ open('/etc/passwd').read() }}",
    "{{ lipsum(100000) }}",
    "{{ '{0.__class__}'.format('') }}",
]


@pytest.mark.parametrize("source", ESCAPES)
def test_sandbox_escapes_are_refused(source):
    with pytest.raises(UserError, match="chat template"):
        render(source)


BOMBS = [
    "{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}",  # huge output
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",  # silent spin
    "{% for c in 'x' * 999999 %}{% for d in 'y' * 999999 %}{% endfor %}{% endfor %}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",  # unbounded recursion
    "{% macro f(n) %}{% for i in range(10) %}{{ f(n) if n < 8 }}{% endfor %}{% endmacro %}{{ f(0) }}",
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "{% set ns = namespace(s=[1]) %}{% for i in range(64) %}{% set ns.s = ns.s * 2 %}{% endfor %}",
    "{{ 'x' * 1000000000 }}",
    "{{ 'x' | center(1000000000) }}",
    "{{ 'x'.ljust(999999) * 2 }}",
    "{{ '%1000000000s' % 'x' }}",
    "{{ '%*s' % (999999999, 'x') }}",
    "{{ '{:>1000000000}'.format('x') }}",
    "{{ '{:>{}}'.format('x', 999999999) }}",
    "{{ 'x' | format('%0999999999d') }}",
    "{{ '%0999999d' | format(1) }}{{ '%0999999d' | format(1) }}",
    "{{ 10 ** 100000000 }}",
    "{{ range(1000) | map('string') | map('center', 999999) | join }}",
    "{{ ('x' * 999999) | replace('x', 'yy') }}",
    "{{ ('x' * 999999).replace('x', 'yy') }}",
    "{{ ('\t' * 999999).expandtabs(100) }}",
    "{{ ('\n' * 900000) | indent(100) }}",
    "{{ [1] | batch(1000000000, 'x') | list }}",
    "{% set s = 'x' * 999999 %}{{ [s, s, s, s] | join }}",
    "{% set s = 'x' * 999999 %}{{ ''.join([s, s, s, s]) }}",
    "{% set s = 'x' * 999999 %}{{ [s, s, s, s] }}",
    "{% set s = 'x' * 999999 %}{{ [s, s, s, s] | string }}",
    "{{ messages | tojson(indent=1000000) }}",
]


@pytest.mark.parametrize("source", BOMBS)
def test_resource_bombs_are_refused_before_they_are_built(source):
    """Refused by a size check before the bomb is built (memory stays far below any bomb's size), or
    by the time bound (FAST: 0.3 s of the 1 ms-per-check clock) for the ones that only spin."""
    tracemalloc.start()
    try:
        with pytest.raises(UserError, match="chat template"):
            render(source)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB allocated"  # the bombs build 100 MiB to GiBs


def test_default_time_bound_is_two_seconds(clock):
    """The bound fires at the first deadline check past 2 s of the render's own clock (a million
    loop iterations, so a bound that never fires fails the test rather than hanging it)."""
    clock.step = 0.25  # exact in binary: 2 s is 8 checks after the render reads its start
    with pytest.raises(UserError, match="took longer than 2 s"):
        ChatTemplate("{% for i in range(1000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}").render(USER)
    assert clock.reads == 10  # the start, 8 checks within the bound, the one past it
    assert TemplateLimits().max_seconds == 2.0


def test_output_bound_message():
    with pytest.raises(UserError, match=r"output would build \d+ characters \(at most 1000\)"):
        render("{% for i in range(100) %}{{ 'x' * 100 }}{% endfor %}", limits=TemplateLimits(max_output_chars=1000))


def test_bounds_do_not_trip_on_normal_use():
    long_chat = [{"role": "user" if i % 2 == 0 else "assistant", "content": "word " * 2000} for i in range(60)]
    out = ChatTemplate(SMOLLM2).render(long_chat)
    assert len(out) > 600_000
    assert out.endswith("<|im_start|>assistant\n")


def test_same_template_renders_repeatedly_and_independently():
    t = ChatTemplate(SMOLLM2, limits=FAST)
    first = t.render(USER)
    with pytest.raises(UserError):
        ChatTemplate(BOMBS[0], limits=FAST).render(USER)
    assert t.render(USER) == first


# -- message validation -----------------------------------------------------


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        (None, "non-empty list"),
        ([{"role": "user", "content": "a"}, "b"], r"messages\[1\] must be an object"),
        ([{"content": "a"}], r"messages\[0\]\.role must be a non-empty string"),
        ([{"role": 3, "content": "a"}], r"messages\[0\]\.role"),
        ([{"role": "", "content": "a"}], r"messages\[0\]\.role"),
        ([{"role": "user"}], r"messages\[0\]\.content is missing"),
        ([{"role": "user", "content": None}], r"messages\[0\]\.content is missing"),
        ([{"role": "user", "content": ["part"]}], r"messages\[0\]\.content must be a string, got list"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": 5}], r"messages\[1\]\.content must"),
    ],
)
def test_bad_messages_are_refused(messages, match):
    with pytest.raises(UserError, match=match):
        ChatTemplate(SMOLLM2).render(messages)


def test_assistant_may_omit_content_for_tool_calls():
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": []}]
    assert "<|assistant|>" in ChatTemplate(TOOLS_TEMPLATE).render(msgs)


def test_template_errors_become_user_errors():
    with pytest.raises(UserError, match="chat template failed"):
        render("{{ 1 / 0 }}")
    with pytest.raises(UserError, match="chat template failed"):
        render("{{ messages[0].nope.deeper }}")
