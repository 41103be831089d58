"""Constrained decoding: a per-step token mask from a grammar (llguidance).

A `Constraint` is a compiled, validated grammar: a JSON Schema, any JSON
(`json_object`), a regular expression or a Lark grammar. It is checked against
the model's tokenizer before any decoding, so a bad schema is a UserError
naming the problem. Each generation then owns a `GrammarMatcher` over it:

  mask(logits)     before penalties and sampling, tokens the grammar does not
                   allow next get -inf (padded ids past the tokenizer's words
                   included); an eos token is allowed only where the grammar
                   may end
  accept(token)    advance the grammar by the sampled token
  forced()         the tokens the grammar forces next (fast-forward: fed to
                   the model in one pass, never sampled)
  rollback(n)      undo the last n tokens (speculative rejection)
  finished         the grammar is complete and takes no more tokens: the
                   generation ends with finish_reason "stop"

A generation that reaches max_tokens before the grammar completes ends with
"length": an eos is never allowed before the grammar accepts, so a complete
finish always means a complete document.

The llguidance tokenizer (`grammar_tokenizer`) is built once per model from
the exported tokenizer.json, with n_vocab = the logits width, and kept on the
model. llguidance computes masks without the GIL, so a batch's masks can be
computed on another thread while the model runs (`MaskPool`).

Cost: a mask is one pass of llguidance's lexer/parser over the vocabulary's
token trie; applying it to a (vocab,) float32 row is an unpackbits and one
boolean store (see benchmarks/structured.py for measured numbers).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from edge_infer.contract.errors import UserError

# JSON as a person (and a small model trained on such text) writes it: ", " and ": ", no other whitespace.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
KINDS = ("json_schema", "json_object", "regex", "lark")
_TOKENIZERS_LOCK = threading.Lock()


def _llguidance():
    try:
        import llguidance
    except ImportError:  # pragma: no cover - a base dependency; only a broken install lacks it
        raise UserError("structured output needs the llguidance package: pip install llguidance") from None
    return llguidance


@dataclass(frozen=True)
class Constraint:
    """A validated grammar in llguidance's format, and what it was made from."""

    kind: str  # json_schema | json_object | regex | lark | tool_call
    grammar: str  # llguidance's grammar JSON
    schema: dict | None = None  # json_schema: the schema, for validating the result
    trigger: int | None = None  # a token id: the grammar runs only after it (runtime.tools.TriggeredMatcher)

    def matcher(self, model):
        inner = GrammarMatcher(self, grammar_tokenizer(model), model.manifest.geometry.vocab_size)
        if self.trigger is None:
            return inner
        from edge_infer.runtime.tools import TriggeredMatcher

        return TriggeredMatcher(inner, self.trigger)


def grammar_tokenizer(model):
    """llguidance's tokenizer for `model`, built once (about 0.6 s for a 49k vocabulary) and kept on it."""
    tok = getattr(model, "_grammar_tokenizer", None)
    if tok is not None:
        return tok
    with _TOKENIZERS_LOCK:
        tok = getattr(model, "_grammar_tokenizer", None)
        if tok is None:
            llg = _llguidance()
            path = model.manifest.folder / model.manifest.tokenizer.file
            eos = sorted(model.tokenizer.eos_ids)
            # n_vocab = the logits width: ids past the tokenizer's words (padding) are never allowed.
            tok = llg.LLTokenizer(str(path), n_vocab=model.manifest.geometry.vocab_size, eos_token=eos or None)
            model._grammar_tokenizer = tok
    return tok


def json_schema_constraint(schema: Any, tokenizer=None) -> Constraint:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise UserError(f"the JSON schema is not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise UserError(f"a JSON schema must be an object, got {type(schema).__name__}")
    llg = _llguidance()
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except (ValueError, TypeError) as e:
        raise UserError(f"invalid JSON schema: {e}") from None
    _validate(grammar, "JSON schema", tokenizer)
    return Constraint("json_schema", grammar, schema if isinstance(schema, dict) else None)


def json_object_constraint(tokenizer=None) -> Constraint:
    """Any JSON object (OpenAI's json_object mode)."""
    c = json_schema_constraint({"type": "object"}, tokenizer)
    return Constraint("json_object", c.grammar, None)


def regex_constraint(regex: str, tokenizer=None) -> Constraint:
    if not isinstance(regex, str) or not regex:
        raise UserError("a regex constraint must be a non-empty string")
    grammar = _llguidance().LLMatcher.grammar_from_regex(regex)
    _validate(grammar, "regular expression", tokenizer)
    return Constraint("regex", grammar)


def lark_constraint(lark: str, tokenizer=None) -> Constraint:
    if not isinstance(lark, str) or not lark.strip():
        raise UserError("a Lark grammar must be a non-empty string")
    grammar = _llguidance().LLMatcher.grammar_from_lark(lark)
    _validate(grammar, "Lark grammar", tokenizer)
    return Constraint("lark", grammar)


def _validate(grammar: str, what: str, tokenizer) -> None:
    is_error, messages = _llguidance().LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
    if is_error:
        detail = " ".join((messages[0] if messages else "unknown error").split())
        raise UserError(f"invalid {what}: {detail}")


def constraint_from(response_format: Mapping | Constraint | None = None, grammar: Any = None, *,
                    model=None) -> Constraint | None:
    """The Constraint a request asks for, or None.

    response_format: OpenAI's shape: {"type": "text"}, {"type": "json_object"} or
      {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}
      ({"type": "json_schema", "schema": {...}} is accepted too), or a grammar's shape:
      {"type": "regex", "regex": ...} / {"type": "lark", "lark": ...}.
    grammar: a Lark grammar string, or {"type": "regex" | "lark", "regex" | "lark": text}.
    model: when given, the grammar is also checked against its tokenizer.
    """
    if response_format is None and grammar is None:
        return None  # (no llguidance tokenizer is built for requests without a grammar)
    if isinstance(response_format, Mapping) and response_format.get("type") == "text" and grammar is None:
        return None
    tok = grammar_tokenizer(model) if model is not None else None
    if response_format is not None and grammar is not None:
        raise UserError("pass either response_format or grammar, not both")
    if grammar is not None:
        if isinstance(grammar, Constraint):
            return grammar
        if isinstance(grammar, str):
            return lark_constraint(grammar, tok)
        if isinstance(grammar, Mapping):
            kind = grammar.get("type")
            if kind == "regex" and set(grammar) <= {"type", "regex"}:
                return regex_constraint(_string(grammar.get("regex"), "grammar.regex"), tok)
            if kind == "lark" and set(grammar) <= {"type", "lark"}:
                return lark_constraint(_string(grammar.get("lark"), "grammar.lark"), tok)
        raise UserError("grammar must be a Lark grammar string, {'type': 'regex', 'regex': ...} or "
                        "{'type': 'lark', 'lark': ...}")
    if response_format is None:
        return None
    if isinstance(response_format, Constraint):
        return response_format
    if not isinstance(response_format, Mapping):
        raise UserError("response_format must be an object with a 'type'")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind in ("regex", "lark"):  # beyond OpenAI's types: the grammar shapes, as `grammar` takes them
        return constraint_from(grammar=dict(response_format), model=model)
    if kind == "json_object":
        return json_object_constraint(tok)
    if kind == "json_schema":
        spec = response_format.get("json_schema", response_format)
        if not isinstance(spec, Mapping) or "schema" not in spec:
            raise UserError("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}")
        schema = spec["schema"]
        if spec.get("strict") is True:  # OpenAI's strict mode: objects list every property they may have
            schema = closed(schema)
        return json_schema_constraint(schema, tok)
    raise UserError(f"response_format type must be text, json_object, json_schema, regex or lark, got {kind!r}")


def closed(schema: Any) -> Any:
    """A copy of `schema` whose objects allow no properties beyond those listed, unless they say otherwise
    (OpenAI's strict mode; a small model otherwise keeps inventing keys)."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (closed(v) if k in ("items", "anyOf", "oneOf", "allOf", "prefixItems", "not") else v)
           for k, v in schema.items()}
    for key in ("properties", "$defs", "definitions", "patternProperties"):
        if isinstance(schema.get(key), dict):
            out[key] = {name: closed(v) for name, v in schema[key].items()}
    is_object = schema.get("type") == "object" or "properties" in schema
    if is_object and "additionalProperties" not in schema and "patternProperties" not in schema:
        out["additionalProperties"] = False
    return out


class GrammarMatcher:
    """One generation's position in a grammar."""

    def __init__(self, constraint: Constraint, tokenizer, vocab: int):
        llg = _llguidance()
        self.constraint = constraint
        self.vocab = vocab
        self._m = llg.LLMatcher(tokenizer, constraint.grammar, log_level=0)
        self.eos = frozenset(tokenizer.eos_tokens)
        if self._m.is_error():
            raise UserError(f"invalid {constraint.kind}: {self._m.get_error()}")
        self.bitmask = np.full((1, (vocab + 31) // 32), -1, dtype=np.int32)  # (1, words): one bit per token id

    @property
    def raw(self):
        """The llguidance matcher (for batched mask filling)."""
        return self._m

    def fill(self, bitmask: np.ndarray | None = None, index: int = 0) -> None:
        """Compute the next-token mask into bitmask[index] (default: this matcher's own). Releases the GIL."""
        target = self.bitmask if bitmask is None else bitmask
        row = target[index]
        self._m.unsafe_compute_mask_ptr(row.ctypes.data, row.size * row.itemsize)

    def mask(self, logits: np.ndarray, bitmask_row: np.ndarray | None = None) -> np.ndarray:
        """logits (vocab,) with disallowed ids at -inf; a new array (the input may be a model buffer).

        bitmask_row: (words,) an already filled mask; computed here when None.
        """
        if bitmask_row is None:
            self.fill()
            bitmask_row = self.bitmask[0]
        return apply_mask(logits, bitmask_row)

    def accept(self, token: int) -> None:
        if not self._m.consume_token(int(token)):
            # Only a sampler that ignored the mask (or a forced token the model was not given) gets here.
            raise RuntimeError(f"token {token} is not allowed by the grammar: {self._m.get_error()}")

    def validate(self, tokens: list[int]) -> int:
        """How many leading tokens the grammar would accept, without consuming them."""
        return self._m.validate_tokens([int(t) for t in tokens]) if tokens else 0

    def forced(self) -> list[int]:
        """Tokens the grammar forces next (empty when there is a choice)."""
        return [] if self.finished else list(self._m.compute_ff_tokens())

    def rollback(self, n: int) -> None:
        if n:
            self._m.rollback(n)

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows no further token."""
        return self._m.is_stopped()

    @property
    def accepting(self) -> bool:
        return self._m.is_accepting()


def constrain_guesses(matcher, guesses: list[int], qs) -> tuple[list[int], object, list]:
    """Speculation under a grammar: keep the leading guesses the grammar accepts, and the mask for
    each verification row (row i follows guesses[:i]). The matcher ends where it started (rolled
    back); the tokens finally accepted are then consumed one by one as usual.

    Returns (guesses, qs, masks): masks[i] is (words,) for row i, len(guesses) + 1 of them.
    A lazy grammar (runtime.tools.TriggeredMatcher) not yet triggered allows everything up to the
    trigger; a triggered one is checked by its inner grammar, up to where that grammar completes.
    """
    lazy = hasattr(matcher, "inner")
    everything = np.full(matcher.bitmask.shape[1], -1, dtype=np.int32)  # (words,) all allowed
    if lazy and not matcher.active:
        guesses = guesses[:matcher.validate(guesses)]
        return guesses, (qs[:len(guesses)] if qs is not None else None), [everything] * (len(guesses) + 1)
    target = matcher.inner if lazy else matcher
    guesses = guesses[:target.validate(guesses)]
    masks, consumed = [], 0
    for i, g in enumerate(guesses):
        target.fill()
        masks.append(target.bitmask[0].copy())
        if g in target.eos:  # nothing follows an eos; it ends the grammar without being consumed
            guesses = guesses[:i + 1]
            break
        target.accept(g)
        consumed += 1
        if target.finished:  # complete: a lazy grammar lets anything follow, a plain one only eos
            guesses = guesses[:i + 1]
            break
    if lazy and target.finished:
        masks.append(everything)
    else:
        target.fill()
        masks.append(target.bitmask[0].copy())
    target.rollback(consumed)
    return guesses, (qs[:len(guesses)] if qs is not None else None), masks


def mask_rows(rows: np.ndarray, masks: list) -> np.ndarray:
    """rows: (k + 1, vocab) verification logits; each row masked by its own (words,) mask."""
    return np.stack([apply_mask(rows[i], masks[i]) for i in range(rows.shape[0])])


def apply_mask(logits: np.ndarray, bitmask_row: np.ndarray) -> np.ndarray:
    """logits: (vocab,); bitmask_row: (words,) int32, bit i of word w allows id 32 w + i. Returns a copy."""
    vocab = logits.shape[-1]
    allowed = np.unpackbits(bitmask_row.view(np.uint8), bitorder="little", count=vocab).view(bool)  # (vocab,)
    out = np.where(allowed, logits, np.float32(-np.inf)).astype(np.float32, copy=False)
    if not allowed.any():
        raise RuntimeError("the grammar allows no token here")
    return out


class MaskPool:
    """Fill several matchers' masks on llguidance's own thread pool (one call, GIL released).

    `submit` does it on a helper thread, so the masks of a batched step are computed while the
    model runs that step (the next-token mask depends only on the tokens already accepted).
    """

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor

        self._executor = _llguidance().LLExecutor()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="edge-infer-masks")

    def submit(self, matchers: list[GrammarMatcher]):
        """A Future of the (len(matchers), words) int32 masks."""
        bitmask = np.full((len(matchers), (matchers[0].vocab + 31) // 32), -1, dtype=np.int32)

        def run() -> np.ndarray:
            self.fill(matchers, bitmask)
            return bitmask

        return self._thread.submit(run)

    def close(self) -> None:
        self._thread.shutdown(wait=False)

    def fill(self, matchers: list[GrammarMatcher], bitmask: np.ndarray) -> None:
        """bitmask: (n, words) int32, C-contiguous; row i gets matchers[i]'s mask."""
        assert bitmask.dtype == np.int32 and bitmask.flags["C_CONTIGUOUS"] and bitmask.shape[0] >= len(matchers)
        if not matchers:
            return
        pairs = [(m.raw, i) for i, m in enumerate(matchers)]
        self._executor.unsafe_compute_mask_ptr(pairs, bitmask.ctypes.data, bitmask.shape[1] * 4, bitmask.shape[0])


def _string(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{name} must be a string, got {type(value).__name__}")
    return value
