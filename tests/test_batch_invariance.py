"""Batch invariance: a position's logits do not depend on how its pass was grouped.

int4/int8 exports multiply with int8 activations, and GroupQueryAttention has a separate one-token
path: a one-token pass can round differently from a pass of several tokens. The graph runs the
attention of a one-token pass as two tokens (export/graph.py _one_token_padding), and where this
machine's matmuls also differ between 1 and M rows (a 4-bit MatMulNBits on an AVX-512 AMD EPYC,
FACTS.md) Model.forward_rows gives every one-id row a padding id ("rows" mode). Which mode is
needed is probed at load (devices/padding.py). Here both modes are forced on any machine: where the
probe says a mode is enough, every grouping must give the same bits; where it says not, the test
checks that the probe said so and that "auto" then picks the mode that is enough. The probe itself
is checked against the real model (a one-token pass without padding).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import edge_infer
from edge_infer.contract.io_names import INPUT_IDS
from edge_infer.devices import cpu_session_options
from edge_infer.devices.invariance import FROM_TWO, ROW_INVARIANT, ProbeResult
from edge_infer.devices.ort import ort
from edge_infer.runtime import model as model_module
from edge_infer.runtime.generate import decode_tokens
from edge_infer.runtime.sampling import SamplingParams, make_sampler
from edge_infer.runtime.speculative import SpeculativeConfig

IDS = [5, 17, 99, 3, 250, 41, 8, 77, 12, 140, 33, 6, 201, 58, 90, 14, 3, 17, 99, 3]
GQA = "GroupQueryAttention"


@pytest.fixture(scope="module", autouse=True)
def probe_cache(tmp_path_factory):
    """The probe's verdicts go to a folder of this test session, not the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGE_INFER_CACHE_DIR", str(tmp_path_factory.mktemp("probe-cache")))
        yield


@pytest.fixture(scope="module", params=["int4", "int8", "int4-rescore"])
def folder(request, tiny_exports):
    quant, _, head = request.param.partition("-")  # rescore: a 4-bit lm_head scan + rescored candidates
    return tiny_exports("llama", quant, **({"lm_head": head} if head else {}))


@pytest.fixture(scope="module", params=["attention", "rows"])
def model(request, folder):
    return edge_infer.load(folder, device="cpu", threads=2, padding=request.param)


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
    cache.row(2).advance_rows([[1] * 4])  # the idle row holds 4 positions
    for t in ids:
        feeds = [IDS[::-1][other:other + 3] or [1], [t], []]
        rows = m.forward_rows(feeds, cache)
        out.append(rows[1][0])  # the pass advanced each row by its feed
        other += len(feeds[0])
    return np.stack(out)


def needs_rows(m) -> list[ProbeResult]:
    """The matmul configurations the probe found differing between 1 and 2 rows on this machine."""
    return [r for r in m.padding.probes if r.config.op != GQA and r.verdict == FROM_TWO]


def probe_says_not_enough(m) -> None:
    """A forced mode the probe reports as not invariant: only attention padding on a machine where a
    matmul needs a second row (the other cases fail test_auto_picks_the_cheapest_verified_mode)."""
    assert m.padding.mode == "attention" and needs_rows(m), m.describe_padding()


def test_every_grouping_gives_the_same_logits_bitwise(model):
    ref = one_pass(model, IDS)
    diffs = {name: np.abs(got - ref).max(axis=-1)  # (n,)
             for name, got in [("one-token steps", one_token_steps(model, IDS)), ("chunks of 3", chunks(model, IDS, 3)),
                               ("chunks of 7", chunks(model, IDS, 7)), ("a batched row", batched_row(model, IDS))]}
    if not model.batch_invariant:
        return probe_says_not_enough(model)
    for name, diff in diffs.items():
        assert not diff.any(), (f"{name}: positions {np.flatnonzero(diff).tolist()} differ, up to {diff.max()}, "
                                f"though the probe said {model.describe_padding()}")


def test_auto_picks_the_cheapest_verified_mode(folder):
    auto = edge_infer.load(folder, device="cpu", threads=2)
    attention, rows = (edge_infer.load(folder, device="cpu", threads=2, padding=p) for p in ("attention", "rows"))
    assert rows.batch_invariant, rows.describe_padding()  # what both known machine types need at most (FACTS.md)
    assert auto.batch_invariant, auto.describe_padding()
    want = "attention" if attention.batch_invariant else "rows"
    assert auto.padding.mode == want and auto.pad_ids == (want == "rows"), auto.describe_padding()
    assert attention.batch_invariant == (not needs_rows(attention))


def test_without_padding_a_one_token_step_follows_the_probe(folder):
    """The probe, checked on the real graph: the last id alone after a past with no spare position (so
    the graph cannot pad) against the same position in a pass over all ids. GroupQueryAttention's
    one-token path rounds differently where the probe says so (compared at layer 0, whose inputs are
    the same bits when the matmuls are row-invariant), and the logits agree where it says every
    kernel gives a row the same bits alone."""
    m = edge_infer.load(folder, device="cpu", threads=2)
    proto = onnx.load(str(m.manifest.folder / m.manifest.graph_file))
    attention = next(n.output[0] for n in proto.graph.node if n.op_type == GQA)  # layer 0's output
    proto.graph.output.append(onnx.helper.make_tensor_value_info(attention, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(proto.SerializeToString(), cpu_session_options(2), providers=m.providers)
    g = m.manifest.geometry

    def run(ids, past_k, past_v):  # -> (logits (n, vocab), layer-0 attention (n, width), present keys, values)
        n, start = len(ids), past_k[0].shape[2]
        feed = {"input_ids": np.array([ids]), "attention_mask": np.ones((1, start + n), np.int64),
                "logits_to_keep": np.array([n]), "query_seqlens": np.array([n]), "pad_attention": np.array([1])}
        for i in range(g.num_layers):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = past_k[i], past_v[i]
        out = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
        keys = [out[f"present.{i}.key"] for i in range(g.num_layers)]
        return out["logits"][0], out[attention][0], keys, [out[f"present.{i}.value"] for i in range(g.num_layers)]

    empty = [np.zeros((1, g.num_kv_heads, 0, g.head_dim), np.float32)] * g.num_layers
    n = len(IDS) - 1
    wide_logits, wide_attn, keys, values = run(IDS, empty, empty)
    past = ([np.ascontiguousarray(k[:, :, :n]) for k in keys], [np.ascontiguousarray(v[:, :, :n]) for v in values])
    logits, attn, _, _ = run(IDS[n:], *past)
    assert attn.shape[0] == 1, "the graph padded the pass: the past must leave no room"
    gqa = [r for r in m.padding.probes if r.config.op == GQA]
    matmuls = [r for r in m.padding.probes if r.config.op != GQA]
    if all(r.verdict == ROW_INVARIANT for r in matmuls):  # layer 0's attention gets the same input bits
        differs = bool(np.abs(attn[0] - wide_attn[n]).max() > 0)
        assert differs == any(r.verdict == FROM_TWO for r in gqa), [r.line() for r in gqa]
    if all(r.verdict == ROW_INVARIANT for r in m.padding.probes):
        np.testing.assert_array_equal(logits[0], wide_logits[n])  # nothing here needs a second row
    if needs_rows(m):
        assert np.abs(logits[0] - wide_logits[n]).max() > 0, [r.line() for r in needs_rows(m)]


def test_greedy_speculation_equals_plain_decoding(model):
    """Exact speculation on int4/int8: the verified ids are plain decoding's, however many guesses
    each round verified (a repetitive prompt makes lookup guesses plentiful)."""
    if not model.batch_invariant:
        return probe_says_not_enough(model)
    prompt = IDS * 3
    greedy = make_sampler(SamplingParams())
    plain = list(decode_tokens(model, prompt, model.new_cache(), greedy, 40))
    for n in (2, 5, 10):
        spec = list(decode_tokens(model, prompt, model.new_cache(), make_sampler(SamplingParams()), 40,
                                     SpeculativeConfig("lookup", num_speculative=n)))
        assert spec == plain, f"num_speculative {n}"


# --- the AVX-512 AMD EPYC's outcome, simulated: a 4-bit MatMulNBits that differs between 1 and 2 rows


def simulate_amd(monkeypatch) -> None:
    """Probe for real, then mark every 4-bit MatMulNBits as FACTS.md measured it on the AMD EPYC."""
    real = model_module.probe_graph

    def probe_graph(configs, *args, **kw):
        return [ProbeResult(r.config, FROM_TWO, "simulated: 1 vs 2+ rows: up to 1.5e-06")
                if r.config.op == "MatMulNBits" and r.config.get("bits") == 4 else r
                for r in real(configs, *args, **kw)]

    monkeypatch.setattr(model_module, "probe_graph", probe_graph)


class _Recording:
    """A session whose IOBindings record the input ids they bind (then run them as usual)."""

    def __init__(self, session, seen: list):
        self._session, self._seen = session, seen

    def __getattr__(self, name):
        return getattr(self._session, name)

    def io_binding(self):
        return _RecordingBinding(self._session.io_binding(), self._seen)

    def run_with_iobinding(self, binding, *args):
        return self._session.run_with_iobinding(binding._binding, *args)


class _RecordingBinding:
    def __init__(self, binding, seen: list):
        self._binding, self._seen = binding, seen

    def __getattr__(self, name):
        return getattr(self._binding, name)

    def bind_cpu_input(self, name, value):
        if name == INPUT_IDS:
            self._seen.append(np.array(value))  # (batch, sequence_length)
        self._binding.bind_cpu_input(name, value)


def bound_ids(m) -> list:
    seen: list = []
    m.session = _Recording(m.session, seen)
    return seen


def test_a_matmul_that_needs_two_rows_turns_on_rows_mode(tiny_exports, monkeypatch):
    simulate_amd(monkeypatch)
    folder = tiny_exports("llama", "int4")
    m = edge_infer.load(folder, device="cpu", threads=2)
    assert m.padding.mode == "rows" and m.pad_ids and m.batch_invariant, m.describe_padding()
    assert "MatMulNBits bits=4" in m.describe_padding() and "differs between 1 and 2 rows" in m.describe_padding()
    seen = bound_ids(m)
    cache = m.new_cache()
    m.forward(np.array([IDS[:5]]), cache)
    m.forward(np.array([[IDS[5]]]), cache)  # a decode step: two rows for every matmul, the previous id re-fed
    m.decode_batch(np.array([IDS[6]]), cache)  # in front, so the step's id is last (one logit row)
    assert [s.tolist() for s in seen[1:]] == [[[IDS[4], IDS[5]]], [[IDS[5], IDS[6]]]] and seen[0].shape == (1, 5)
    m.forward(np.array([[IDS[0]]]), m.new_cache())  # nothing before it: a padding id after it
    assert seen[3].shape == (1, 2) and seen[3][0, 0] == IDS[0]
    np.testing.assert_array_equal(one_token_steps(m, IDS), one_pass(m, IDS))  # rows mode: invariant here too

    forced = edge_infer.load(folder, device="cpu", threads=2, padding="attention")
    assert not forced.batch_invariant and "padding='rows' would make it invariant" in forced.describe_padding()
    seen = bound_ids(forced)
    forced.forward(np.array([[IDS[0]]]), forced.new_cache())
    assert [s.shape for s in seen] == [(1, 1)]  # one row: the graph pads only the attention


def test_the_padding_can_be_forced_by_environment(tiny_exports, monkeypatch):
    monkeypatch.setenv("EDGE_INFER_PADDING", "rows")
    m = edge_infer.load(tiny_exports("llama", "int8"), device="cpu", threads=2)
    assert m.padding.mode == "rows" and m.padding.forced and m.pad_ids
    m.pad_ids = False  # a benchmark switching the padding id off: no longer the verified state
    assert not m.batch_invariant
    monkeypatch.setenv("EDGE_INFER_PADDING", "sideways")
    with pytest.raises(edge_infer.UserError, match="EDGE_INFER_PADDING='sideways'"):
        edge_infer.load(tiny_exports("llama", "int8"), device="cpu", threads=2)


def test_padding_off_runs_one_token_steps_unpadded(tiny_exports):
    """load(padding="off"): the graph's pad_attention input at 0 and no padding id, so a one-token step
    gives the bits of a step with no room left to pad; nothing is claimed invariant. The default pads."""
    folder = tiny_exports("llama", "int4")
    off = edge_infer.load(folder, device="cpu", threads=2, padding="off")
    auto = edge_infer.load(folder, device="cpu", threads=2)
    assert off.padding.mode == "off" and not off.batch_invariant and "turned off" in off.describe_padding()
    ids = IDS[:8]

    def step(m, max_length: int) -> np.ndarray:
        cache = m.new_cache(max_length=max_length)
        m.forward(np.array([ids]), cache)
        return m.forward(np.array([[5]]), cache)[0, -1]

    # With room the graph would pad (flag 1); at the cache's last position it cannot: flag 0 must give those bits.
    np.testing.assert_array_equal(step(off, len(ids) + 8), step(off, len(ids) + 1))
    if auto.batch_invariant:  # padded: the bits of the same position in one wider pass
        wide = auto.forward(np.array([ids + [5]]), auto.new_cache(max_length=len(ids) + 8), logits_to_keep=1)[0, -1]
        np.testing.assert_array_equal(step(auto, len(ids) + 8), wide)
