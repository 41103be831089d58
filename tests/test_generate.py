"""Generation behaviour on tiny models: prompts, context limits, streaming invariants, stops, chat."""

import numpy as np
import pytest

import edge_infer
from edge_infer.runtime.chat import ChatSession
from edge_infer.contract.errors import ContextLengthError, UserError


@pytest.fixture(scope="module")
def model(tiny_exports):
    return edge_infer.load(tiny_exports("llama", "fp32"), device="cpu")


def run(model, prompt, **kw):
    chunks = list(edge_infer.stream_generate(model, prompt, **kw))
    return chunks, "".join(c.text for c in chunks), [c.token for c in chunks if c.token is not None]


def test_prompt_forms(model):
    ids = model.tokenizer.encode("hello world")
    _, by_text, _ = run(model, "hello world", max_tokens=5)
    _, by_ids, _ = run(model, ids, max_tokens=5)
    assert by_text == by_ids
    _, chat, _ = run(model, [{"role": "user", "content": "hello"}], max_tokens=5)
    assert isinstance(chat, str)


@pytest.mark.parametrize("prompt, message", [
    ("", "prompt is empty"),
    ([], "prompt is empty"),
    ([1, 2, 10**9], "outside the vocabulary"),
    ([{"role": "user"}], "content"),
    ([3.5], "prompt must be a string"),
])
def test_bad_prompts(model, prompt, message):
    with pytest.raises(UserError, match=message):
        run(model, prompt, max_tokens=2)


def test_bad_options(model):
    with pytest.raises(UserError, match="temperature"):
        run(model, "hi", temperature=-1)
    with pytest.raises(UserError, match="unknown sampling option"):
        run(model, "hi", temprature=0.5)
    with pytest.raises(UserError, match="max_tokens"):
        run(model, "hi", max_tokens=0)


def test_context_overflow_is_an_error_before_any_work(model):
    ids = list(range(5, 5 + 100))
    with pytest.raises(ContextLengthError, match=r"prompt \(100 tokens\) \+ max_tokens \(50\) = 150 exceeds the context of 128"):
        run(model, ids, max_tokens=50)
    with pytest.raises(ContextLengthError, match="the prompt is 200 tokens but the context holds 128"):
        run(model, list(range(5, 205)))


def test_without_max_tokens_generation_stops_exactly_at_the_context_limit(model):
    ids = [5 + (i * 7) % 300 for i in range(120)]
    chunks, _, tokens = run(model, ids, temperature=1.0, seed=3)  # sampling rarely hits eos
    last = chunks[-1]
    if last.finish_reason.value == "length":
        assert len(ids) + last.timings.generation_tokens == 128
    assert last.timings.generation_tokens <= 8


@pytest.mark.parametrize("seed", range(6))
def test_joined_deltas_equal_the_full_decode(model, seed):
    chunks, text, tokens = run(model, "Emoji 🙂 and 日本語", max_tokens=40, temperature=1.5, seed=seed)
    eos = model.tokenizer.eos_ids
    generated = [t for t in tokens if t not in eos]
    assert text == model.tokenizer.decode(generated)
    for c in chunks:
        c.text.encode("utf-8")  # every chunk is valid UTF-8 (no lone surrogates)


def test_seed_makes_sampling_reproducible(model):
    a = run(model, "hello", max_tokens=20, temperature=1.0, top_p=0.9, seed=7)[1]
    b = run(model, "hello", max_tokens=20, temperature=1.0, top_p=0.9, seed=7)[1]
    assert a == b


def test_stop_string_split_across_tokens_never_leaks(model):
    _, full, _ = run(model, "The quick", max_tokens=40, temperature=1.0, seed=11)
    assert len(full) > 12
    stop = full[5:12]
    chunks, text, _ = run(model, "The quick", max_tokens=40, temperature=1.0, seed=11, stop=[stop])
    assert text == full[: full.index(stop)]
    assert chunks[-1].finish_reason.value == "stop"
    assert stop not in text


def test_max_tokens_gives_finish_length_and_timings(model):
    chunks, _, tokens = run(model, "hello", max_tokens=7, temperature=1.0, seed=5)
    last = chunks[-1]
    t = last.timings
    assert t.prompt_tokens == len(model.tokenizer.encode("hello"))
    if last.finish_reason.value == "length":
        assert t.generation_tokens == 7
    assert t.time_to_first_token > 0 and t.generation_tokens == len(tokens)


def test_eos_gives_finish_stop(tiny_exports):
    m = edge_infer.load(tiny_exports("llama", "fp32"), device="cpu")
    eos = next(iter(m.tokenizer.eos_ids))
    # Find a greedy continuation, then make its first token the eos id through the model's own eos set.
    first = run(m, "hello", max_tokens=1)[2][0]
    m.tokenizer.eos_ids = frozenset({first, eos})
    chunks, text, _ = run(m, "hello", max_tokens=10)
    assert chunks[-1].finish_reason.value == "stop" and text == ""


def test_chat_session_reuses_the_cache_across_turns(model):
    chat = ChatSession(model, max_tokens=8)
    first = list(chat.send("hello there"))
    second = list(chat.send("and again"))
    # at least the whole first prompt is reused (the reply too when its text re-tokenizes to the same ids)
    assert second[-1].timings.cached_tokens >= first[-1].timings.prompt_tokens
    assert len(chat.history) == 4


def test_chat_session_drops_oldest_turns_to_fit(model):
    chat = ChatSession(model, max_tokens=16)
    for i in range(12):
        list(chat.send(f"message number {i} with some words"))
    assert chat.dropped > 0 or len(chat.history) < 24
    ids = model.tokenizer.encode(model.chat_template.render(chat.history), add_special_tokens=False)
    assert len(ids) <= model.max_length


def test_cache_trim_then_refill_equals_fresh_run(model):
    ids = np.array([[5, 6, 7, 8, 9, 10, 11, 12]])
    cache = model.new_cache()
    model.forward(ids, cache)
    cache.trim(4)
    again = model.forward(np.array([[40, 41, 42, 43]]), cache, logits_to_keep=4)[0]
    fresh = model.forward(np.array([[5, 6, 7, 8, 40, 41, 42, 43]]), model.new_cache(), logits_to_keep=4)[0]
    np.testing.assert_allclose(again, fresh, atol=1e-4)


def test_the_step_after_a_prefill_hands_the_arena_back(model, monkeypatch):
    """A pass wider than WIDE_PASS_IDS (a prefill chunk) grows onnxruntime's CPU arena; the next narrower
    pass, and only that one, runs with the option that shrinks it, and the ids do not change."""
    from edge_infer.runtime import model as runtime_model

    real, shrinks = model.session, []

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def run_with_iobinding(self, binding, run_options=None):
            key = "memory.enable_memory_arena_shrinkage"
            shrinks.append(run_options.get_run_config_entry(key) if run_options is not None else None)
            return real.run_with_iobinding(binding, run_options)

    prompt = (model.tokenizer.encode("the quick brown fox jumps over the lazy dog ") * 40)[:runtime_model.WIDE_PASS_IDS + 6]
    monkeypatch.setattr(model, "session", Spy())
    _, _, ids = run(model, prompt, max_tokens=5, speculative="off")
    assert shrinks == [None, "cpu:0", None, None, None]  # the prefill chunk, then 4 decode steps
    monkeypatch.setattr(runtime_model, "WIDE_PASS_IDS", 10**9)  # never shrink
    shrinks.clear()
    assert run(model, prompt, max_tokens=5, speculative="off")[2] == ids
    assert shrinks == [None] * 5
