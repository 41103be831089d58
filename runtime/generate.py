"""Generation in three layers, as in mlx-lm:

  decode_tokens    yields token ids (prefill, then one decode step or speculative round at a time)
  stream_generate  yields Chunks: text deltas, finish reason, timings
  generate         returns the whole text

The loop itself (plain steps and speculative rounds alike) and the token -> text/stop/finish
logic are runtime/decode.py's, shared with the server's engine; sampling is a callable from
runtime/sampling.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence, Union

import numpy as np

from edge_infer.runtime.cache import KVCache, reusable
from edge_infer.runtime.chat_template import check_template_kwargs
from edge_infer.runtime.constrain import Constraint, constraint_from
from edge_infer.runtime.decode import PREFILL_CHUNK, Decoding, FinishReason, TextStream, decode_tokens, prefill
from edge_infer.contract.errors import ContextLengthError, UserError, check_text
from edge_infer.runtime.model import Model
from edge_infer.runtime.sampling import SamplingParams, make_sampler
from edge_infer.runtime.speculative import SpeculativeConfig, SpecStats, speculative_config
from edge_infer.runtime.tools import CallWatch, output_constraint, split_calls, tool_prompt

Prompt = Union[str, Sequence[int], Sequence[dict]]
DEFAULT_MAX_TOKENS = 256
__all__ = ["FinishReason", "PREFILL_CHUNK", "prefill", "decode_tokens", "stream_generate", "generate"]


@dataclass(frozen=True)
class Timings:
    prompt_tokens: int
    generation_tokens: int
    cached_tokens: int
    time_to_first_token: float  # seconds, request start to first token
    prefill_tokens_per_s: float
    decode_tokens_per_s: float  # tokens after the first, over their time
    speculative: str = "off"  # off | lookup | draft
    draft_tokens: int = 0  # guesses sent to the target for verification
    accepted_tokens: int = 0  # guesses the target accepted
    target_passes: int = 0  # target decode passes after the prompt (speculative runs only)
    acceptance_rate: float = 0.0  # accepted_tokens / draft_tokens
    tokens_per_target_pass: float = 0.0  # tokens after the first per target decode pass (1.0 = plain)


@dataclass(frozen=True)
class Chunk:
    text: str  # the new text; "" while a multi-byte character or a possible stop string is held back
    token: int | None  # the id sampled this step (None on the final flush)
    finish_reason: FinishReason | None = None
    timings: Timings | None = None
    tool_calls: tuple = ()  # the final chunk of a request with tools: runtime.tools.ToolCall, parsed from the reply


@dataclass
class _Clock:
    start: float = field(default_factory=time.perf_counter)
    first: float | None = None
    last: float | None = None


def encode_prompt(model: Model, prompt: Prompt, template_kwargs: Mapping[str, Any] | None = None) -> list[int]:
    """Token ids for a string, a list of ids, or chat messages (rendered with the model's template;
    `template_kwargs` are more variables for it, e.g. {"enable_thinking": False} for Qwen3)."""
    if isinstance(prompt, str):
        if not prompt:
            raise UserError("prompt is empty")
        return model.tokenizer.encode(check_text(prompt, "prompt"), add_special_tokens=True)
    items: list[Any] = list(prompt)
    if not items:
        raise UserError("prompt is empty")
    if all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in items):
        vocab = model.manifest.geometry.vocab_size
        bad = [t for t in items if not 0 <= int(t) < vocab]
        if bad:
            raise UserError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        return [int(t) for t in items]
    if all(isinstance(m, dict) for m in items):
        if model.chat_template is None:
            raise UserError("this model has no chat template; pass a plain string prompt instead of messages")
        for i, m in enumerate(items):
            for key, value in m.items():
                if isinstance(value, str):
                    check_text(value, f"messages[{i}].{key}")
        text = model.chat_template.render(items, add_generation_prompt=True, **check_template_kwargs(template_kwargs))
        return model.tokenizer.encode(text, add_special_tokens=False)
    raise UserError("prompt must be a string, a list of token ids, or a list of {'role', 'content'} messages")


def plan_max_tokens(model: Model, n_prompt: int, max_tokens: int | None, max_length: int) -> int:
    """Check the prompt fits before any work. An explicit max_tokens must fit too; without one,
    generation runs up to the default or the end of the context, whichever comes first."""
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise UserError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if n_prompt >= max_length:
        raise ContextLengthError(
            f"the prompt is {n_prompt} tokens but the context holds {max_length} (including at least one new "
            f"token); shorten the prompt or export with a larger --max-length"
        )
    room = max_length - n_prompt
    if max_tokens is None:
        return min(DEFAULT_MAX_TOKENS, room)
    if max_tokens > room:
        raise ContextLengthError(
            f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) = {n_prompt + max_tokens} exceeds the "
            f"context of {max_length}; lower max_tokens to at most {room}"
        )
    return max_tokens


def stream_generate(model: Model, prompt: Prompt, *, max_tokens: int | None = None,
                    sampling: SamplingParams | None = None, stop: Sequence[str] = (),
                    cache: KVCache | None = None, speculative: SpeculativeConfig | str | None = "auto",
                    draft_cache: KVCache | None = None, response_format: dict | Constraint | None = None,
                    grammar: str | dict | Constraint | None = None, tools: list[dict] | None = None,
                    tool_choice: str | dict | None = None, parallel_tool_calls: bool = True,
                    template_kwargs: Mapping[str, Any] | None = None, **sampling_kw) -> Iterator[Chunk]:
    """Stream the completion of `prompt` as Chunks; the last one carries finish_reason and timings.

    `response_format` ({"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": ...}})
    or `grammar` (a Lark grammar, or {"type": "regex", "regex": ...}) constrain the output
    (runtime/constrain.py); finish_reason is "stop" only once the grammar is complete. Tokens the grammar
    forces are fed in one pass; with speculation, guesses are checked against the grammar.
    `tools` (OpenAI's shape) with `tool_choice` and `parallel_tool_calls`: the tools go into the prompt
    (runtime/tools.py) and the final chunk carries the parsed `tool_calls` (finish_reason "tool_calls").
    `template_kwargs`: more variables for the chat template ({"enable_thinking": False} turns a Qwen3
    model's thinking off; runtime/reasoning.py splits the thinking from the answer).

    `speculative`: "auto" (the default: prompt lookup while its guesses pay, plain steps when
    they keep failing), "lookup", "off" or None (plain decoding), or a SpeculativeConfig (needed
    for a draft model). The output is plain decoding's: identical ids when greedy (on int4 and
    int8 exports too: see Model.forward_rows), the same distribution when sampling. (Not with
    `load(padding="off")`, which gives up that invariance for faster one-token steps.)
    `draft_cache` keeps the draft model's prefix across calls, as `cache` does for the model.
    """
    clock = _Clock()
    if isinstance(speculative, str) or speculative is None:
        speculative = speculative_config(speculative)
    elif not isinstance(speculative, SpeculativeConfig):
        raise UserError(f"speculative must be 'auto', 'off', 'lookup' or a SpeculativeConfig, got {speculative!r}")
    if sampling is None:
        sampling = SamplingParams.from_dict(sampling_kw)
    elif sampling_kw:
        raise UserError("pass either sampling=SamplingParams(...) or sampling keywords, not both")
    sampler = make_sampler(sampling)
    constraint = constraint_from(response_format, grammar, model=model)  # a bad grammar fails before any work
    plan = None
    if tools is not None:
        prompt, plan = tool_prompt(model, prompt, tools, tool_choice, parallel_tool_calls, template_kwargs)
        constraint = output_constraint(plan, constraint, "response_format or grammar")
    if isinstance(stop, str):
        stop = [stop]
    text = TextStream(model.tokenizer.backend, model.tokenizer.eos_ids, list(stop), max_tokens=1)
    ids = encode_prompt(model, prompt, template_kwargs)
    cache = cache if cache is not None else model.new_cache()
    budget = plan_max_tokens(model, len(ids), max_tokens, cache.max_length)
    text.max_tokens = budget
    cached = reusable(cache.tokens, ids)  # what decode_tokens' cache.reuse keeps
    stats = SpecStats()
    decoding = Decoding(model, ids, sampler, cache, speculative, draft_cache, stats,
                        constraint.matcher(model) if constraint is not None else None)
    steps = decoding.stream(budget)  # decode_tokens, keeping the Decoding for the grammar-complete rule
    reply: list[str] = []  # the whole text, when tool calls are parsed from it
    watch = CallWatch(plan) if plan is not None and CallWatch.wanted(plan) else None
    for token in steps:
        now = time.perf_counter()
        clock.first = clock.first or now
        clock.last = now
        delta, reason = text.add(token)
        if plan is not None:
            reply.append(delta)
        reason = decoding.finish(text.generated, reason)  # the grammar is complete: STOP
        if reason is None and watch is not None and watch.feed(delta):
            reason = FinishReason.STOP  # a tool call repeated an earlier one: the list ends before it
        if delta or text.reason is not FinishReason.STOP:  # no chunk for an eos id or an empty stop
            yield Chunk(delta, token)
        if reason is not None:
            break
    steps.close()  # a stop string or eos ended the loop early: release the generator now
    tail, finish = text.tail(reason)
    calls: tuple = ()
    if plan is not None:  # calls completed before a cut (finish "length") or a repeated call are kept
        _, found, reason_text = split_calls("".join(reply) + tail, finish.value, plan)
        calls, finish = tuple(found), FinishReason(reason_text)
    yield Chunk(tail, None, finish, _timings(clock, len(ids), text.generated, cached, stats), calls)


def _timings(clock: _Clock, n_prompt: int, n_gen: int, cached: int, spec: SpecStats) -> Timings:
    first = clock.first or time.perf_counter()
    ttft = first - clock.start
    return Timings(
        prompt_tokens=n_prompt, generation_tokens=n_gen, cached_tokens=cached, time_to_first_token=ttft,
        prefill_tokens_per_s=(n_prompt - cached) / ttft if ttft > 0 else 0.0,
        decode_tokens_per_s=decode_rate(n_gen, first, clock.last),
        speculative=spec.mode, draft_tokens=spec.proposed, accepted_tokens=spec.accepted,
        target_passes=spec.target_passes, acceptance_rate=spec.acceptance_rate,
        tokens_per_target_pass=(n_gen - 1) / spec.target_passes if spec.target_passes else 0.0,
    )


def decode_rate(generated: int, first: float, last: float | None) -> float:
    """Decode speed: the tokens after the first over the time from the first to the last (perf_counter
    seconds); 0 when there is nothing to measure."""
    span = (last - first) if last else 0.0
    return (generated - 1) / span if generated > 1 and span > 0 else 0.0


def generate(model: Model, prompt: Prompt, **kw) -> str:
    """The whole completion as one string."""
    return "".join(c.text for c in stream_generate(model, prompt, **kw))
