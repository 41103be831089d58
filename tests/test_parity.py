"""fp32 exports against transformers, for every supported architecture, on tiny random models."""

import numpy as np
import pytest
import torch

import edge_infer
from tiny import ARCHS, hf_greedy, load_reference, our_greedy

TOL = 1e-3
PROMPT = [5, 17, 42, 99, 7, 250, 31, 8, 64, 120, 3, 77]  # longer than the tiny sliding windows (7)


def hf_logits(ref, ids):
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0].numpy()  # (sequence_length, vocab)


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, tiny_checkpoints, tiny_exports):
    kind = request.param
    return kind, load_reference(tiny_checkpoints(kind)), edge_infer.load(tiny_exports(kind, "fp32"), device="cpu")


def test_prompt_pass_all_positions(pair):
    kind, ref, model = pair
    cache = model.new_cache()
    ours = model.forward(np.array([PROMPT]), cache, logits_to_keep=len(PROMPT))[0]
    np.testing.assert_allclose(ours, hf_logits(ref, PROMPT), atol=TOL, rtol=0, err_msg=kind)


def test_decode_steps_with_past(pair):
    kind, ref, model = pair
    cache = model.new_cache()
    model.forward(np.array([PROMPT[:6]]), cache)
    expected = hf_logits(ref, PROMPT)
    for t in range(6, len(PROMPT)):
        step = model.forward(np.array([[PROMPT[t]]]), cache)[0, -1]
        np.testing.assert_allclose(step, expected[t], atol=TOL, rtol=0, err_msg=f"{kind} step {t}")


def test_greedy_32_steps_identical(pair):
    kind, ref, model = pair
    assert our_greedy(model, PROMPT, 32) == hf_greedy(ref, PROMPT, 32), kind


def test_cached_equals_uncached_and_chunked_prefill(pair):
    kind, _, model = pair
    seq = PROMPT + [11, 12, 13, 14, 15, 16, 17, 18]
    full = model.forward(np.array([seq]), model.new_cache(), logits_to_keep=len(seq))[0]
    cache = model.new_cache()
    model.forward(np.array([seq[:5]]), cache)
    chunk = model.forward(np.array([seq[5:9]]), cache, logits_to_keep=4)[0]
    np.testing.assert_allclose(chunk, full[5:9], atol=TOL, rtol=0, err_msg=kind)
    for t in range(9, len(seq)):
        step = model.forward(np.array([[seq[t]]]), cache)[0, -1]
        np.testing.assert_allclose(step, full[t], atol=TOL, rtol=0, err_msg=f"{kind} position {t}")
