"""Constrained decoding (runtime/constrain.py) through the Python API and the CLI, on a tiny random model.

A random model left alone almost never writes valid JSON; every output below must parse and match.
"""

import json
import re

import jsonschema
import numpy as np
import pytest
from click.testing import CliRunner

import edge_infer
from edge_infer.cli import main
from edge_infer.runtime.constrain import apply_mask, constraint_from
from edge_infer.runtime.generate import FinishReason, stream_generate

SCHEMA = {"type": "object", "properties": {
    "color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"},
    "n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["color", "ok", "n"],
    "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def model(tiny_exports):
    return edge_infer.load(tiny_exports("llama", "fp32"), device="cpu", threads=1)


def finish(model, prompt, **kw):
    chunks = list(stream_generate(model, prompt, **kw))
    return "".join(c.text for c in chunks), chunks[-1].finish_reason


@pytest.mark.parametrize("seed", [None, 1, 2, 3])
def test_json_schema_output_is_valid_and_ends_with_stop(model, seed):
    sampling = {} if seed is None else {"temperature": 1.0, "seed": seed}
    text, reason = finish(model, "Paris is", max_tokens=60, response_format=FORMAT, **sampling)
    assert reason == FinishReason.STOP, text
    jsonschema.validate(json.loads(text), SCHEMA)


def test_unconstrained_tiny_model_does_not_write_this_json(model):
    """The reference the test above is measured against: the same request without the constraint."""
    text = edge_infer.generate(model, "Paris is", max_tokens=60)
    with pytest.raises(ValueError):
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_regex_and_lark(model):
    text, reason = finish(model, "Paris is", max_tokens=80, response_format={"type": "json_object"},
                          temperature=0.8, seed=5, repetition_penalty=1.3)
    if reason == FinishReason.STOP:
        assert isinstance(json.loads(text), dict)
    else:  # ran out of tokens first: never claimed complete
        assert reason == FinishReason.LENGTH
    text, reason = finish(model, "Call", max_tokens=20, grammar={"type": "regex", "regex": r"[0-9]{3}-[0-9]{4}"})
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", text) and reason == FinishReason.STOP
    lark = 'start: "answer: " ANSWER\nANSWER: "yes" | "no" | "maybe"\n'
    text, reason = finish(model, "Well", max_tokens=20, grammar=lark)
    assert text in ("answer: yes", "answer: no", "answer: maybe") and reason == FinishReason.STOP


def test_max_tokens_before_the_grammar_completes_is_length(model):
    text, reason = finish(model, "Paris is", max_tokens=3, response_format=FORMAT)
    assert reason == FinishReason.LENGTH
    with pytest.raises(ValueError):
        json.loads(text)


def test_forced_tokens_are_fed_in_one_pass(model):
    """A grammar with no choice at all: one sampled token, the rest fast-forwarded, two model passes."""
    calls = []
    forward = model.forward

    def counting(ids, cache, **kw):
        calls.append(ids.shape[1])
        return forward(ids, cache, **kw)

    model.forward = counting
    try:
        text, reason = finish(model, "Paris is", max_tokens=40, grammar='start: "The quick brown fox jumps"')
    finally:
        del model.forward
    assert text == "The quick brown fox jumps" and reason == FinishReason.STOP
    assert len(calls) <= 2, calls  # the prompt pass, at most one more


@pytest.mark.parametrize("kw, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}}, "Invalid type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "string",
                                                                             "format": "weird"}}}}, "format"),
    ({"response_format": {"type": "xml"}}, "response_format type"),
    ({"grammar": {"type": "regex", "regex": "a(b"}}, "unclosed group"),
    ({"grammar": "start: missing_rule"}, "missing_rule"),
    ({"grammar": 42}, "grammar must be"),
])
def test_bad_grammars_are_user_errors_before_decoding(model, kw, message):
    calls = []
    model.forward = lambda *a, **k: calls.append(1)
    try:
        with pytest.raises(edge_infer.UserError, match=message):
            edge_infer.generate(model, "Paris is", max_tokens=5, **kw)
    finally:
        del model.forward
    assert not calls


def test_mask_covers_padded_ids_and_keeps_allowed_logits():
    vocab = 70  # a logits row wider than the 64 ids the mask words describe... and not a multiple of 32
    bitmask = np.zeros(3, dtype=np.int32)
    bitmask[0] = 0b101  # ids 0 and 2
    bitmask[2] = 1 << 5  # id 69
    logits = np.arange(vocab, dtype=np.float32)
    out = apply_mask(logits, bitmask)
    assert np.flatnonzero(np.isfinite(out)).tolist() == [0, 2, 69]
    assert out[69] == 69 and logits[1] == 1  # the input is untouched


def test_grammar_tokenizer_uses_the_logits_width(model):
    from edge_infer.runtime.constrain import grammar_tokenizer

    assert grammar_tokenizer(model).vocab_size == model.manifest.geometry.vocab_size
    assert grammar_tokenizer(model) is grammar_tokenizer(model)  # built once
    assert constraint_from({"type": "text"}) is None


def test_cli_structured_options(tiny_exports, tmp_path):
    runner = CliRunner()
    folder = str(tiny_exports("llama", "fp32"))
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(SCHEMA))
    r = runner.invoke(main, ["run", folder, "hi", "--json-schema", str(schema), "--max-tokens", "60", "--no-stats"])
    assert r.exit_code == 0, r.output
    jsonschema.validate(json.loads(r.output), SCHEMA)
    r = runner.invoke(main, ["run", folder, "hi", "--regex", "(yes|no)", "--no-stats"])
    assert r.exit_code == 0 and r.output.strip() in ("yes", "no"), r.output
    lark = tmp_path / "g.lark"
    lark.write_text('start: "x" DIGIT\nDIGIT: /[0-9]/\n')
    r = runner.invoke(main, ["run", folder, "hi", "--grammar", str(lark), "--no-stats"])
    assert r.exit_code == 0 and re.fullmatch(r"x[0-9]", r.output.strip()), r.output
    r = runner.invoke(main, ["run", folder, "hi", "--json"])
    assert r.exit_code == 0
    for args, text in ((["--regex", "a(b"], "unclosed group"), (["--json", "--regex", "a"], "cannot be combined"),
                       (["--json-schema", str(lark)], "not valid JSON")):
        r = runner.invoke(main, ["run", folder, "hi", *args])
        assert r.exit_code == 2 and text in r.output and "Traceback" not in r.output, r.output


def test_constrain_guesses_cuts_at_the_first_refused_guess_and_rolls_back(model):
    """Speculative guesses under a grammar: the valid prefix (an eos ends it) and one mask per verification row;
    the matcher is left where it was, so the accepted tokens are then consumed as usual."""
    from edge_infer.runtime.constrain import constrain_guesses, regex_constraint

    m = regex_constraint("[0-9]{3}").matcher(model)
    enc = model.tokenizer.encode
    digits = [t for t in enc("123", add_special_tokens=False)]
    eos = min(model.tokenizer.eos_ids)
    m.accept(digits[0])
    guesses, qs, masks = constrain_guesses(m, digits[1:] + enc("x", add_special_tokens=False), None)
    assert guesses == digits[1:] and qs is None and len(masks) == len(guesses) + 1
    assert m.validate(digits[1:]) == len(digits) - 1  # rolled back: the same guesses are valid again
    for g in digits[1:]:
        m.accept(g)
    assert m.accepting
    m2 = regex_constraint("[0-9]{3}x?").matcher(model)  # accepting after 3 digits, not finished
    for t in digits:
        m2.accept(t)
    guesses, _, masks = constrain_guesses(m2, [eos, digits[0]], None)
    assert guesses == [eos] and len(masks) == 2 and m2.accepting  # nothing after an eos; state unchanged


@pytest.mark.parametrize("grammar", [{"response_format": FORMAT},
                                     {"grammar": {"type": "regex", "regex": "(Paris is ){2,3}[a-z]{1,8}"}}])
def test_speculation_under_a_grammar_gives_the_plain_constrained_output(model, grammar):
    """Prompt lookup proposes guesses from the prompt; the grammar cuts them, masks each verification row and
    rolls back with the cache. Greedy on fp32: the ids equal plain constrained decoding's."""
    prompt = 'Paris is Paris is {"color": "red", "ok": true, "n": 3}'
    plain = list(stream_generate(model, prompt, max_tokens=70, **grammar))
    spec = list(stream_generate(model, prompt, max_tokens=70, speculative="lookup", **grammar))
    assert [c.token for c in spec] == [c.token for c in plain]
    assert spec[-1].finish_reason == plain[-1].finish_reason == FinishReason.STOP
    assert spec[-1].timings.target_passes > 0


def test_requests_without_a_grammar_build_no_grammar_tokenizer(tiny_exports):
    m = edge_infer.load(tiny_exports("llama", "fp32"), device="cpu", threads=1)
    edge_infer.generate(m, "Paris is", max_tokens=2, response_format={"type": "text"})
    assert getattr(m, "_grammar_tokenizer", None) is None  # built on first use only (0.6 s at 49k words)
