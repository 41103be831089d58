"""Batch invariance: a position's logits do not depend on how its pass was grouped.

int4/int8 exports multiply with int8 activations, and GroupQueryAttention has a separate
one-token decode path: a one-token pass rounds differently from a pass of several tokens.
The graph runs the attention of a one-token pass as two tokens (export/graph.py
_one_token_padding) and Model.forward_rows gives a one-id row a padding id in a wider pass, so a
decode step, a speculative verification, a prefill chunk and a row of the server's batched step
give bitwise-identical logits. Without the padding the one-token steps differ.
"""

from __future__ import annotations

import numpy as np
import pytest

import edge_infer
from edge_infer.runtime.generate import generate_step
from edge_infer.runtime.sampling import SamplingParams, make_sampler
from edge_infer.runtime.speculative import SpeculativeConfig, speculative_step

IDS = [5, 17, 99, 3, 250, 41, 8, 77, 12, 140, 33, 6, 201, 58, 90, 14, 3, 17, 99, 3]


@pytest.fixture(scope="module", params=["int4", "int8"])
def model(request, tiny_exports):
    return edge_infer.load(tiny_exports("llama", request.param), device="cpu", threads=2)


def one_pass(m, ids):  # (n, vocab): every position's logits from one pass
    return m.forward(np.array([ids]), m.new_cache(), logits_to_keep=len(ids))[0]


def one_token_steps(m, ids):
    cache = m.new_cache()
    return np.stack([m.forward(np.array([[t]]), cache)[0, -1] for t in ids])


def chunks(m, ids, size):
    cache, out = m.new_cache(), []
    for s in range(0, len(ids), size):
        piece = ids[s:s + size]
        out.append(m.forward(np.array([piece]), cache, logits_to_keep=len(piece))[0])
    return np.concatenate(out)


def batched_row(m, ids):
    """Row 1 of a batch-3 step: one token per step, while row 0 verifies 3 ids a step of another
    sequence and row 2 is idle (the server's batched step with speculation)."""
    cache, out, other = m.new_cache(batch=3), [], 0
    for i, t in enumerate(ids):
        feeds = [IDS[::-1][other:other + 3] or [1], [t], []]
        rows = m.forward_rows(feeds, cache, np.array([other, i, 4]))
        out.append(rows[1][0])
        other = min(other + len(feeds[0]), 100)
    return np.stack(out)


def test_every_grouping_gives_the_same_logits_bitwise(model):
    ref = one_pass(model, IDS)
    for name, got in [("one-token steps", one_token_steps(model, IDS)), ("chunks of 3", chunks(model, IDS, 3)),
                      ("chunks of 7", chunks(model, IDS, 7)), ("a batched row", batched_row(model, IDS))]:
        diff = np.abs(got - ref).max(axis=-1)  # (n,)
        assert not diff.any(), f"{name}: positions {np.flatnonzero(diff).tolist()} differ, up to {diff.max()}"


def test_without_padding_one_token_steps_differ(model):
    """The check above can fail: where the graph has no room to pad its attention (a past without a
    spare position), a one-token pass takes GroupQueryAttention's decode path and rounds differently."""
    ref = one_pass(model, IDS)
    n = len(IDS) - 1
    cache = model.new_cache()
    model.forward(np.array([IDS[:n]]), cache)
    feed = {"input_ids": np.array([[IDS[n]]]), "attention_mask": np.ones((1, n + 1), np.int64),
            "logits_to_keep": np.array([1]), "query_seqlens": np.array([1])}
    for i in range(model.manifest.geometry.num_layers):  # a past of exactly n positions: no room
        feed[f"past_key_values.{i}.key"] = np.ascontiguousarray(cache.keys[i][:, :, :n])
        feed[f"past_key_values.{i}.value"] = np.ascontiguousarray(cache.values[i][:, :, :n])
    unpadded = model.session.run(["logits"], feed)[0][0, -1]
    assert np.abs(unpadded - ref[-1]).max() > 0


def test_greedy_speculation_equals_plain_decoding(model):
    """Exact speculation on int4/int8: the verified ids are plain decoding's, however many guesses
    each round verified (a repetitive prompt makes lookup guesses plentiful)."""
    prompt = IDS * 3
    greedy = make_sampler(SamplingParams())
    plain = list(generate_step(model, prompt, model.new_cache(), greedy, 40))
    for n in (2, 5, 10):
        spec = list(speculative_step(model, prompt, model.new_cache(), make_sampler(SamplingParams()), 40,
                                     SpeculativeConfig("lookup", num_speculative=n)))
        assert spec == plain, f"num_speculative {n}"
