"""Speculative decoding in the server: a request decoding alone verifies guesses in one pass
on its row; greedy output equals plain decoding whatever runs beside it."""

import queue

import numpy as np
import pytest

import edge_infer
from edge_infer.runtime import decode as decode_module
from edge_infer.runtime.decode import Decoding, decode_step, prefill
from edge_infer.runtime.generate import decode_tokens
from edge_infer.runtime.sampling import SamplingParams, make_sampler
from edge_infer.runtime.speculative import SpeculativeConfig
from edge_infer.runtime.speculative_proposers import pass_width
from edge_infer.serve.config import EngineConfig
from edge_infer.serve.engine import Engine
from edge_infer.serve.request import Delta, GenerationRequest

RNG = np.random.default_rng(11)
SPAN = [40, 41, 42, 43, 44, 45, 46, 47, 48, 49]
PROMPTS = [  # repeated spans give lookup something to copy; random ones make it back off
    SPAN + [200, 201] + SPAN + [200],
    [11, 12, 13] * 8,
    [int(t) for t in RNG.integers(3, 350, 30)] * 2,
    [int(t) for t in RNG.integers(3, 350, 40)],
    [5, 17, 42, 99, 7, 250, 31, 8, 64, 120, 3, 77],
    [9, 9, 9, 9, 9],
]
BUDGETS = [40, 25, 60, 33, 50, 12]


@pytest.fixture(scope="module")
def target(tiny_exports):
    return edge_infer.load(tiny_exports("llama", "fp32"), device="cpu", threads=1)


@pytest.fixture(scope="module")
def int4_draft(tiny_exports):
    return edge_infer.load(tiny_exports("llama", "int4"), device="cpu", threads=1)


def plain(model, prompt, n):
    return list(decode_tokens(model, list(prompt), model.new_cache(), make_sampler(SamplingParams()), n))


def run_ids(engine: Engine, prompts, budgets, params=SamplingParams()):
    """Submit all at once; returns each request's generated ids and its finished event."""
    queues = []
    for i, (p, n) in enumerate(zip(prompts, budgets)):
        q = queue.Queue()
        engine.submit(GenerationRequest(tuple(p), n, params, request_id=str(i)), q.put)
        queues.append(q)
    out = []
    for q in queues:
        while isinstance(event := q.get(timeout=60), Delta):
            pass
        out.append(event)
    return out


def accepted(engine: Engine) -> float:
    return engine.metrics.speculative.labels("accepted")._value.get()


@pytest.mark.parametrize("parallel", [1, 3])
@pytest.mark.parametrize("mode", ["lookup", "draft"])
def test_greedy_output_equals_plain_decoding(target, int4_draft, parallel, mode):
    config = SpeculativeConfig("lookup") if mode == "lookup" else SpeculativeConfig("draft", draft=int4_draft)
    engine = Engine(target, EngineConfig(parallel=parallel, prefill_chunk=16, speculative=config))
    tokens: dict[int, list[int]] = {}

    def record(turn, emitted):  # every token each row chose, in order, per request
        for e in emitted:
            tokens.setdefault(int(e.seq.request.request_id), []).extend(e.tokens)

    engine.observe(record)
    engine.start()
    try:
        events = run_ids(engine, PROMPTS, BUDGETS)
    finally:
        engine.stop()
    for i, (p, n) in enumerate(zip(PROMPTS, BUDGETS)):
        want = plain(target, p, n)
        assert tokens[i][:len(want)] == want, f"request {i}"
        assert events[i].usage.completion_tokens == len(want)
    if parallel == 1:
        assert accepted(engine) > 0  # guesses were verified in batches, not only decoded one by one


@pytest.mark.parametrize("mode", ["lookup", "draft"])
def test_a_request_left_alone_speculates(target, int4_draft, mode):
    """Batched while others decode; once the short requests end, the long one verifies guesses."""
    config = SpeculativeConfig("lookup") if mode == "lookup" else SpeculativeConfig("draft", draft=int4_draft)
    engine = Engine(target, EngineConfig(parallel=3, speculative=config))
    engine.start()
    try:
        events = run_ids(engine, [PROMPTS[1], PROMPTS[3], PROMPTS[4]], [80, 4, 4])
    finally:
        engine.stop()
    want = [len(plain(target, p, n)) for p, n in zip([PROMPTS[1], PROMPTS[3], PROMPTS[4]], [80, 4, 4])]
    assert [e.usage.completion_tokens for e in events] == want
    assert accepted(engine) > 0


def test_without_speculation_no_guesses_are_counted(target):
    engine = Engine(target, EngineConfig(parallel=2))
    engine.start()
    try:
        run_ids(engine, PROMPTS[:2], [20, 20])
    finally:
        engine.stop()
    assert accepted(engine) == 0


def test_sampled_requests_finish_with_their_budget(target):
    engine = Engine(target, EngineConfig(parallel=2, speculative=SpeculativeConfig("lookup")))
    engine.start()
    try:
        events = run_ids(engine, PROMPTS[:3], [30, 30, 30], SamplingParams(temperature=0.8, seed=3))
    finally:
        engine.stop()
    assert all(e.finish_reason in ("length", "stop") for e in events)
    assert all(e.usage.completion_tokens <= 30 for e in events)


def test_speculation_respects_the_slot_length(target):
    """Guesses never run past the slot: a request that fills its slot ends at the limit."""
    engine = Engine(target, EngineConfig(parallel=1, max_length=40, speculative=SpeculativeConfig("lookup")))
    engine.start()
    try:
        (event,) = run_ids(engine, [[11, 12, 13] * 4], [28])
    finally:
        engine.stop()
    assert event.usage.completion_tokens == 28 and event.finish_reason == "length"
    assert engine.slots[0].row.offset <= 39


def test_pass_width_weighs_what_a_wider_pass_costs_every_row():
    """A batched pass is as wide as its widest row: guesses must pay for every row's extra ids."""
    assert pass_width([(3, 0.5)], rows=1, per_token=0.2, padded=False) == 2  # a lone row: its own ids only
    assert pass_width([(1, 0.9)] + [(0, 0.0)] * 7, rows=8, per_token=0.2, padded=False) == 1  # one row widens 8
    assert pass_width([(1, 0.6)] * 8, rows=8, per_token=0.2, padded=False) == 1  # middling odds on every row
    assert pass_width([(1, 0.95)] * 8, rows=8, per_token=0.2, padded=False) == 2  # every row guessing well
    assert pass_width([(1, 0.5)] + [(0, 0.0)] * 7, rows=8, per_token=0.2, padded=True) == 2  # "rows": 2 wide anyway


@pytest.mark.parametrize("odds", [0.6, 0.95])
def test_a_batched_pass_cuts_the_guesses_that_do_not_pay_and_stays_exact(int4_draft, odds, monkeypatch):
    """Eight rows copying their prompt: each row's own estimate verifies guesses, the pass keeps them only
    where they pay for all eight rows' extra ids; the ids are plain decoding's either way."""
    model, prompt, steps = int4_draft, PROMPTS[1], 8
    cache = model.new_cache(batch=8, max_length=64)
    decodings = []
    for r in range(8):
        d = Decoding(model, prompt, make_sampler(SamplingParams()), cache.row(r), SpeculativeConfig(mode="lookup"))
        d.first(prefill(model, list(prompt), cache.row(r)))
        d.proposer.lookup_acceptance.prior = (100 * odds, 100 * (1 - odds))  # the estimate, held fixed
        decodings.append(d)
    proposed, kept = [], []  # per pass that had guesses: the widest row before and after the cut
    cut = decode_module._batch_guesses

    def spy(model, decodings, feeds):
        proposed.append(max(map(len, feeds)))
        feeds = cut(model, decodings, feeds)
        kept.append(max(map(len, feeds)))
        return feeds

    monkeypatch.setattr(decode_module, "_batch_guesses", spy)
    out = [[d.token] for d in decodings]
    for _ in range(steps):
        for ids, emitted in zip(out, decode_step(model, cache, decodings, [3] * 8)):
            ids += emitted
    assert proposed and min(proposed) > 1  # the rows' own choice: guesses
    if odds == 0.95:
        assert kept == proposed  # worth eight rows' wider pass
    else:  # not worth it, unless one-id rows are two wide anyway ("rows" padding)
        assert kept == [2 if model.pad_ids else 1] * len(proposed)
    assert all(ids == plain(model, prompt, len(out[0])) for ids in out)
