"""Sampler: greedy, each filter, penalties, reproducibility, and draws match probs()."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge_infer.contract.errors import UserError
from edge_infer.runtime import sampling
from edge_infer.runtime.sampling import SamplingParams, draw, make_sampler


def logits_of(p) -> np.ndarray:
    """Logits whose softmax (temperature 1) is p: (vocab,) float32."""
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(p, dtype=np.float64)).astype(np.float32)


def probs(logits, tokens=(), n_prompt=0, **params) -> np.ndarray:
    return make_sampler(SamplingParams(**params)).probs(np.asarray(logits, np.float32), tokens, n_prompt)


P = [0.05, 0.4, 0.1, 0.3, 0.15]  # order by probability: 1, 3, 4, 2, 0


# -- greedy -----------------------------------------------------------------


def test_greedy_is_argmax():
    rng = np.random.default_rng(0)
    s = make_sampler(SamplingParams())
    for _ in range(20):
        x = rng.standard_normal(50_000).astype(np.float32)
        assert s(x, [], 0) == int(np.argmax(x))
        onehot = s.probs(x, [], 0)
        assert onehot.dtype == np.float64 and onehot.sum() == 1.0 and onehot[np.argmax(x)] == 1.0


def test_greedy_ties_go_to_lowest_id():
    assert make_sampler(SamplingParams())(np.array([0, 3, 1, 3, 3], np.float32), [], 0) == 1


def test_greedy_ignores_filters_and_uses_no_randomness():
    s = make_sampler(SamplingParams(top_k=2, top_p=0.5, min_p=0.3, seed=1))
    state = s.rng.bit_generator.state
    assert s(logits_of(P), [], 0) == 1
    assert s.rng.bit_generator.state == state


# -- temperature and filters on small hand-made distributions -----------------


def test_temperature_one_is_softmax():
    np.testing.assert_allclose(probs(logits_of(P), temperature=1.0), P, rtol=1e-6)


def test_temperature_sharpens_and_flattens():
    x = logits_of(P)
    for t in (0.5, 2.0):
        expected = np.power(P, 1 / t) / np.power(P, 1 / t).sum()
        np.testing.assert_allclose(probs(x, temperature=t), expected, rtol=1e-6)


def test_top_k():
    got = probs(logits_of(P), temperature=1.0, top_k=2)
    np.testing.assert_allclose(got, [0, 0.4 / 0.7, 0, 0.3 / 0.7, 0], rtol=1e-6)
    np.testing.assert_allclose(probs(logits_of(P), temperature=1.0, top_k=1), [0, 1, 0, 0, 0])
    np.testing.assert_allclose(probs(logits_of(P), temperature=1.0, top_k=99), P, rtol=1e-6)  # k >= vocab: off


def test_top_p_keeps_smallest_head_reaching_p():
    x = logits_of(P)
    # cumulative by rank: 0.4, 0.7, 0.85, 0.95, 1.0
    np.testing.assert_allclose(probs(x, temperature=1.0, top_p=0.7), [0, 0.4 / 0.7, 0, 0.3 / 0.7, 0], rtol=1e-5)
    np.testing.assert_allclose(probs(x, temperature=1.0, top_p=0.71), [0, 0.4, 0, 0.3, 0.15] / np.float64(0.85),
                               rtol=1e-5)
    np.testing.assert_allclose(probs(x, temperature=1.0, top_p=0.1), [0, 1, 0, 0, 0])
    np.testing.assert_allclose(probs(x, temperature=1.0, top_p=1.0), P, rtol=1e-6)


def test_top_p_after_top_k_renormalises_first():
    # top-k=3 leaves 0.4, 0.3, 0.15 -> 0.47, 0.35, 0.18; top_p=0.8 then keeps two.
    got = probs(logits_of(P), temperature=1.0, top_k=3, top_p=0.8)
    np.testing.assert_allclose(got, [0, 0.4 / 0.7, 0, 0.3 / 0.7, 0], rtol=1e-5)


def test_min_p_is_relative_to_the_top_token():
    # threshold 0.5 * 0.4 = 0.2 keeps 0.4 and 0.3
    got = probs(logits_of(P), temperature=1.0, min_p=0.5)
    np.testing.assert_allclose(got, [0, 0.4 / 0.7, 0, 0.3 / 0.7, 0], rtol=1e-5)
    got = probs(logits_of(P), temperature=1.0, min_p=0.3)  # threshold 0.12 keeps 0.15 too
    np.testing.assert_allclose(got, [0, 0.4, 0, 0.3, 0.15] / np.float64(0.85), rtol=1e-5)


def test_filters_always_keep_one_token():
    x = logits_of([0.25, 0.25, 0.25, 0.25])
    got = probs(x, temperature=1.0, top_k=1, top_p=0.01, min_p=0.99)
    assert got.sum() == pytest.approx(1.0) and np.count_nonzero(got) == 1


def test_top_p_grows_its_head_on_flat_large_vocab():
    vocab = 100_000
    x = np.zeros(vocab, np.float32)
    got = probs(x, temperature=1.0, top_p=0.5)
    assert np.count_nonzero(got) == vocab // 2
    assert got.sum() == pytest.approx(1.0)
    # ties resolved by id: the lowest half is kept
    assert got[: vocab // 2].min() > 0 and got[vocab // 2 :].max() == 0


def test_masked_logits_are_never_sampled():
    x = np.array([-np.inf, 0.0, -np.inf, 1.0], np.float32)
    s = make_sampler(SamplingParams(temperature=1.5, seed=0))
    assert {s(x, [], 0) for _ in range(200)} == {1, 3}


def test_bad_logits_are_internal_errors():
    s = make_sampler(SamplingParams(temperature=1.0))
    with pytest.raises(ValueError, match="NaN"):
        s(np.array([0.0, np.nan], np.float32), [], 0)
    with pytest.raises(ValueError):
        s(np.full(4, -np.inf, np.float32), [], 0)
    with pytest.raises(ValueError, match="NaN"):
        make_sampler(SamplingParams())(np.array([np.nan, 1.0], np.float32), [], 0)
    with pytest.raises(ValueError, match="one row"):
        s(np.zeros((2, 4), np.float32), [], 0)


# -- penalties ----------------------------------------------------------------


def penalised(x, tokens, n_prompt, **params) -> np.ndarray:
    return make_sampler(SamplingParams(**params))._penalise(np.asarray(x, np.float32), tokens, n_prompt)


def test_repetition_penalty_divides_positive_multiplies_negative():
    x = [2.0, -2.0, 1.0, -1.0, 0.5]
    got = penalised(x, [0, 1, 1, 4], n_prompt=4, repetition_penalty=2.0)  # whole context, count-free
    np.testing.assert_allclose(got, [1.0, -4.0, 1.0, -1.0, 0.25])


def test_presence_and_frequency_only_over_generated():
    x = [1.0, 1.0, 1.0, 1.0]
    tokens = [0, 0, 1, 2, 2, 2, 3]  # prompt [0, 0, 1], generated [2, 2, 2, 3]
    got = penalised(x, tokens, n_prompt=3, presence_penalty=0.5, frequency_penalty=0.25)
    np.testing.assert_allclose(got, [1.0, 1.0, 1.0 - 0.5 - 3 * 0.25, 1.0 - 0.5 - 0.25])
    got = penalised(x, tokens, n_prompt=3, presence_penalty=-1.0)  # negative encourages
    np.testing.assert_allclose(got, [1.0, 1.0, 2.0, 2.0])


def test_penalties_compose_in_order():
    got = penalised([3.0, -1.0], [0, 1, 0], n_prompt=1, repetition_penalty=1.5, frequency_penalty=1.0)
    # repetition first: 3/1.5 = 2, -1*1.5 = -1.5; then frequency over generated [1, 0]
    np.testing.assert_allclose(got, [1.0, -2.5])


def test_penalties_do_not_modify_the_callers_logits():
    x = np.array([2.0, 1.0], np.float32)
    make_sampler(SamplingParams(repetition_penalty=2.0))(x, [0], 0)
    np.testing.assert_array_equal(x, [2.0, 1.0])


def test_penalty_changes_greedy_choice():
    x = np.array([1.0, 0.9], np.float32)
    s = make_sampler(SamplingParams(repetition_penalty=1.3))
    assert s(x, [], 0) == 0 and s(x, [0], 1) == 1
    assert s.probs(x, np.array([0]), 1)[1] == 1.0


def test_context_ids_outside_vocab_are_internal_errors():
    with pytest.raises(ValueError, match="context token ids"):
        penalised([0.0, 0.0], [5], 0, repetition_penalty=1.2)


# -- randomness -----------------------------------------------------------------


def test_same_seed_same_tokens():
    rng = np.random.default_rng(5)
    rows = rng.standard_normal((50, 1000)).astype(np.float32)
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    runs = []
    for _ in range(2):
        s = make_sampler(params)
        runs.append([s(row, [], 0) for row in rows])
    assert runs[0] == runs[1]
    other = make_sampler(SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=99))
    assert [other(row, [], 0) for row in rows] != runs[0]


@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=1.0),
        dict(temperature=0.7, top_k=4),
        dict(temperature=1.3, top_p=0.8),
        dict(temperature=1.0, min_p=0.1),
        dict(temperature=0.8, top_k=6, top_p=0.9, min_p=0.05, repetition_penalty=1.2, frequency_penalty=0.3),
    ],
)
def test_sampled_frequencies_match_probs(params):
    """Chi-square goodness of fit of 20k draws against probs(), on a small vocab."""
    x = np.random.default_rng(11).standard_normal(8).astype(np.float32) * 1.5
    tokens, n_prompt = [1, 2, 2, 5], 2
    s = make_sampler(SamplingParams(seed=7, **params))
    p = s.probs(x, tokens, n_prompt)
    assert p.sum() == pytest.approx(1.0)
    n = 20_000
    counts = np.bincount([s(x, tokens, n_prompt) for _ in range(n)], minlength=8)
    assert np.all(counts[p == 0] == 0)  # filtered tokens never drawn
    kept = p > 0
    expected = n * p[kept]
    chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
    dof = max(int(kept.sum()) - 1, 1)
    # Far beyond the 99.9th percentile (< dof + 6*sqrt(2*dof) + 10 for these dofs).
    assert chi2 < dof + 6 * math.sqrt(2 * dof) + 10, (chi2, counts, expected)


def testdraw_on_a_long_distribution_with_zero_blocks():
    """The block walk of draw: exact positions at the edges, right frequencies overall."""
    p = np.zeros(10_000)
    p[[0, 1023, 1024, 5000, 9999]] = [0.1, 0.2, 0.3, 0.15, 0.25]
    assert draw(p, 0.0) == 0
    assert draw(p, np.nextafter(1.0, 0.0)) == 9999
    # cumulative mass: 0.1 | 0.3 | 0.6 | 0.75 | 1.0
    assert [draw(p, u) for u in (0.05, 0.15, 0.31, 0.65, 0.8)] == [0, 1023, 1024, 5000, 9999]
    rng = np.random.default_rng(0)
    counts = np.bincount([draw(p, rng.random()) for _ in range(20_000)], minlength=10_000)
    assert set(np.flatnonzero(counts)) == {0, 1023, 1024, 5000, 9999}
    np.testing.assert_allclose(counts[[0, 1023, 1024, 5000, 9999]] / 20_000, [0.1, 0.2, 0.3, 0.15, 0.25], atol=0.015)
    tail_zero = p.copy()
    tail_zero[9999], tail_zero[0] = 0.0, 0.35
    assert draw(tail_zero, np.nextafter(1.0, 0.0)) == 5000


def test_probs_uses_no_randomness():
    s = make_sampler(SamplingParams(temperature=1.0, seed=3))
    state = s.rng.bit_generator.state
    s.probs(np.zeros(10, np.float32), [], 0)
    assert s.rng.bit_generator.state == state


class CountingNumpy:
    """numpy, recording the size of the array each sort-, exp-, cumsum- or unique-like call works on."""

    WATCHED = ("sort", "argsort", "lexsort", "argpartition", "partition", "exp", "cumsum", "unique")

    def __init__(self):
        self.calls: list[tuple[str, int]] = []

    def __getattr__(self, name):
        attr = getattr(np, name)
        if name not in self.WATCHED:
            return attr

        def counted(a, *args, **kw):
            self.calls.append((name, int(np.size(a[0] if name == "lexsort" else a))))
            return attr(a, *args, **kw)

        return counted


def test_large_vocab_step_makes_one_pass_over_the_vocab(monkeypatch):
    """The cost model of runtime/sampling.py's docstring, counted rather than timed: with top-k on a
    150k vocab the only vocab-sized call is top-k's argpartition; the softmax, top-p's sort and the
    draw see k tokens, np.unique the context. Without top-k, top-p sorts a head, never the vocab.
    (The step's speed: benchmarks/sampler_step.py.)"""
    vocab, k = 150_000, 40
    x = np.random.default_rng(0).standard_normal(vocab).astype(np.float32) * 3
    tokens = np.random.default_rng(1).integers(0, vocab, 2_000)
    spy = CountingNumpy()
    monkeypatch.setattr(sampling, "np", spy)
    s = make_sampler(SamplingParams(temperature=0.8, top_k=k, top_p=0.95, repetition_penalty=1.1,
                                    frequency_penalty=0.2, seed=0))
    s(x, tokens, 1_000)
    assert [c for c in spy.calls if c[1] > len(tokens)] == [("argpartition", vocab)], spy.calls
    assert {n for n, _ in spy.calls} >= {"argpartition", "exp", "lexsort", "cumsum", "unique"}
    assert all(size <= k for n, size in spy.calls if n in ("exp", "lexsort", "cumsum")), spy.calls

    spy.calls.clear()
    peaked = x.copy()
    peaked[:10] += 40.0  # nearly all the mass in 10 tokens: top-p's first head holds it
    make_sampler(SamplingParams(temperature=0.8, top_p=0.95, seed=0))(peaked, tokens, 1_000)
    sorts = [size for n, size in spy.calls if n in ("sort", "argsort", "lexsort")]
    assert sorts and max(sorts) < vocab // 100, spy.calls


# -- validation -------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("temperature", -0.1, r"temperature must be a finite number >= 0"),
        ("temperature", float("nan"), r"temperature .* got nan"),
        ("temperature", float("inf"), r"temperature"),
        ("temperature", "hot", r"temperature .* got 'hot'"),
        ("top_k", -1, r"top_k must be an integer >= 0"),
        ("top_k", 2.5, r"top_k must be an integer"),
        ("top_k", True, r"top_k must be an integer"),
        ("top_p", 0.0, r"top_p must be a finite number in \(0, 1\]"),
        ("top_p", 1.5, r"top_p"),
        ("top_p", float("nan"), r"top_p"),
        ("min_p", 1.0, r"min_p must be a finite number in \[0, 1\)"),
        ("min_p", -0.1, r"min_p"),
        ("repetition_penalty", 0.0, r"repetition_penalty must be a finite number > 0"),
        ("presence_penalty", 2.5, r"presence_penalty must be a finite number in \[-2, 2\]"),
        ("frequency_penalty", -3, r"frequency_penalty must be a finite number in \[-2, 2\]"),
        ("frequency_penalty", float("nan"), r"frequency_penalty"),
        ("seed", -1, r"seed must be an integer >= 0"),
        ("seed", 1.5, r"seed"),
    ],
)
def test_validation_names_field_and_range(field, value, match):
    with pytest.raises(UserError, match=match):
        make_sampler(SamplingParams(**{field: value}))


def test_valid_edges_accepted():
    make_sampler(SamplingParams(temperature=0, top_p=1.0, min_p=0.0, presence_penalty=-2, frequency_penalty=2,
                                repetition_penalty=0.5, seed=0))
    make_sampler(SamplingParams(temperature=1, top_k=1))  # ints for float fields (JSON)


def test_from_dict():
    p = SamplingParams.from_dict({"temperature": 0.7, "top_p": 0.9, "seed": 1})
    assert p == SamplingParams(temperature=0.7, top_p=0.9, seed=1)
    with pytest.raises(UserError, match=r"unknown sampling option\(s\) tempreature, typo; known options are "
                                        r"temperature, top_k, top_p, min_p"):
        SamplingParams.from_dict({"tempreature": 0.7, "typo": 1})
    with pytest.raises(UserError, match="top_p"):
        SamplingParams.from_dict({"top_p": 2})
    with pytest.raises(UserError, match="mapping"):
        SamplingParams.from_dict([("temperature", 1.0)])


def test_params_are_frozen():
    with pytest.raises(AttributeError):
        SamplingParams().temperature = 1.0  # type: ignore[misc]

