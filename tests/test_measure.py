"""`edge-infer bench` / `eval` logic (bench/measure.py) on tiny models: invariants, no timed assertions."""

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import edge_infer
from edge_infer.cli import main
from edge_infer.bench import measure
from tiny import TEXT

MEASURE_PY = Path(measure.__file__)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "t.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def fp32(tiny_exports):
    return tiny_exports("llama", "fp32")


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def nll_by_hand(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """-log softmax(logits[t-1])[ids[t]] for t >= 1, with a different formula from runtime.sampling.log_softmax."""
    x = logits.astype(np.float64)
    probs = np.exp(x - x.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return -np.log(probs[np.arange(len(ids) - 1), ids[1:]])


# ---------------------------------------------------------------- windows

@pytest.mark.parametrize("n, window, stride", [
    (2, 2, 1), (10, 4, 3), (10, 4, 1), (100, 32, 16), (100, 32, 7), (101, 32, 31), (31, 32, 16), (513, 512, 256)])
def test_windows_score_every_token_but_the_first_exactly_once(n, window, stride):
    wins = measure.strided_windows(n, window, stride)
    targets = [t for w in wins for t in range(w.first_target, w.end)]
    assert targets == list(range(1, n))
    for w in wins:
        assert 0 <= w.begin < w.first_target <= w.end <= n
        assert w.end - w.begin <= window
    assert wins[-1].end == n


def test_windows_after_the_first_keep_window_minus_stride_context():
    wins = measure.strided_windows(1000, 512, 256)
    assert [(w.begin, w.end, w.first_target) for w in wins[:3]] == [(0, 512, 1), (256, 768, 512), (512, 1000, 768)]


@pytest.mark.parametrize("window, stride", [(1, 1), (8, 9), (8, 8), (8, 0)])
def test_windows_refuse_gaps_and_empty_windows(window, stride):
    with pytest.raises(ValueError):
        measure.strided_windows(100, window, stride)


# ---------------------------------------------------------------- perplexity and KL

def test_perplexity_is_exp_of_the_mean_nll_of_full_logits(fp32):
    m = edge_infer.load(fp32, device="cpu")
    ids = np.array(m.tokenizer.encode(TEXT)[:100])
    full = m.forward(ids[None, :], m.new_cache(max_length=100), logits_to_keep=100)[0]  # (100, vocab)
    q = measure.evaluate(measure.edge_logits(m), ids, window=100, stride=50)
    expected = nll_by_hand(full, ids)
    assert q.scored == 99 and q.tokens == 100 and q.windows == 1
    assert q.nll_mean == pytest.approx(expected.mean(), rel=1e-5)
    assert q.perplexity == pytest.approx(math.exp(expected.mean()), rel=1e-5)


def test_strided_perplexity_matches_the_hf_guide_loop(fp32):
    """An independent loop in the style of Hugging Face's guide: labels before the new part are
    masked, and each window's mean loss is weighted by how many labels it scored."""
    m = edge_infer.load(fp32, device="cpu")
    ids = np.array(m.tokenizer.encode(TEXT)[:120])
    window, stride = 48, 20
    nll_sum, n_scored, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        trg_len = end - prev_end
        piece = ids[begin:end]
        logits = m.forward(piece[None, :], m.new_cache(max_length=len(piece)), logits_to_keep=len(piece))[0]
        labels = piece.copy()
        labels[:-trg_len] = -100
        nll = nll_by_hand(logits, piece)  # predicts piece[1:]
        keep = labels[1:] != -100
        nll_sum += nll[keep].sum()
        n_scored += int(keep.sum())
        prev_end = end
        if end == len(ids):
            break
    q = measure.evaluate(measure.edge_logits(m), ids, window=window, stride=stride)
    assert q.scored == n_scored == len(ids) - 1
    assert q.nll_mean == pytest.approx(nll_sum / n_scored, rel=1e-5)


def test_a_model_against_itself_has_zero_kl_and_full_agreement(fp32):
    m = edge_infer.load(fp32, device="cpu")
    ids = m.tokenizer.encode(TEXT)[:90]
    fn = measure.edge_logits(m)
    q = measure.evaluate(fn, ids, window=40, stride=25, reference=fn)
    assert q.kl_mean == 0.0 and q.kl_p99 == 0.0
    assert q.top1_agreement == 1.0
    assert q.reference_perplexity == pytest.approx(q.perplexity)


def test_quantized_model_against_fp32_reference(tiny_exports, fp32):
    model = edge_infer.load(tiny_exports("llama", "int4"), device="cpu")
    ref = edge_infer.load(fp32, device="cpu")
    ids = np.array(model.tokenizer.encode(TEXT)[:80])
    q = measure.evaluate(measure.edge_logits(model), ids, window=80, stride=40, reference=measure.edge_logits(ref))
    alone = measure.evaluate(measure.edge_logits(ref), ids, window=80, stride=40)
    assert q.reference_perplexity == pytest.approx(alone.perplexity, rel=1e-6)
    assert q.kl_mean > 0 and 0.0 <= q.top1_agreement <= 1.0
    # KL by hand at every scored position
    a = ref.forward(ids[None, :], ref.new_cache(max_length=80), logits_to_keep=80)[0][:-1].astype(np.float64)
    b = model.forward(ids[None, :], model.new_cache(max_length=80), logits_to_keep=80)[0][:-1].astype(np.float64)
    p = np.exp(a - a.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    qq = np.exp(b - b.max(-1, keepdims=True))
    qq /= qq.sum(-1, keepdims=True)
    assert q.kl_mean == pytest.approx((p * np.log(p / qq)).sum(-1).mean(), rel=1e-4)
    assert q.top1_agreement == pytest.approx((a.argmax(-1) == b.argmax(-1)).mean())


def test_evaluate_refuses_logits_of_the_wrong_shape():
    with pytest.raises(ValueError, match="seq, vocab"):
        measure.evaluate(lambda ids: np.zeros((1, len(ids), 5)), [1, 2, 3], window=3, stride=2)


# ---------------------------------------------------------------- timing

def test_time_generation_runs_one_prefill_and_new_tokens_minus_one_steps():
    calls = {"prefill": 0, "step": []}

    def prefill(ids):
        calls["prefill"] += 1
        return len(ids)

    def step(token):
        calls["step"].append(token)
        return token + 1

    r = measure.time_generation(prefill, step, [5] * 10, new_tokens=6)
    assert calls["prefill"] == 1 and calls["step"] == [10, 11, 12, 13, 14]
    assert r.first_tokens == (10, 11, 12, 13, 14, 15)
    assert r.prompt_tokens == 10 and r.new_tokens == 6
    assert r.ttft_s > 0 and r.prefill_tok_s > 0 and r.decode_tok_s > 0
    assert r.itl_p95_ms >= r.itl_p50_ms >= 0


def test_prompt_ids_are_exactly_n_tokens_of_the_text():
    assert measure.prompt_ids([1, 2, 3, 4], 2) == [1, 2]
    assert measure.prompt_ids([1, 2, 3], 7) == [1, 2, 3, 1, 2, 3, 1]


def test_medians_over_runs():
    rows = [{f: v for f in measure.MEDIAN_FIELDS} for v in (3.0, 1.0, 2.0)]
    assert measure.medians(rows) == {f: 2.0 for f in measure.MEDIAN_FIELDS}


def test_the_shipped_text_is_long_enough_for_1024_token_prompts(fp32):
    text, desc = measure.read_text()
    assert len(text.split()) > 4000 and "files" in desc
    m = edge_infer.load(fp32, device="cpu")
    assert len(m.tokenizer.encode(text)) > 1024


def test_measure_loads_by_path_with_only_numpy():
    """benchmarks/ loads bench/measure.py by path into the peers' venvs: nothing but numpy at import."""
    code = textwrap.dedent(f"""
        import importlib.util, json, sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('onnxruntime', 'edge_infer', 'torch', 'transformers', 'tokenizers'):
                    raise ImportError(name + ' is blocked in this test')
        sys.meta_path.insert(0, Block())
        spec = importlib.util.spec_from_file_location('measure', {str(MEASURE_PY)!r})
        mod = importlib.util.module_from_spec(spec)
        sys.modules['measure'] = mod
        spec.loader.exec_module(mod)
        r = mod.time_generation(lambda ids: 1, lambda t: t, [0] * 4, 3)
        print(json.dumps({{"machine": sorted(mod.describe_machine(2)), "n": r.new_tokens}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["n"] == 3 and "cpu" in got["machine"] and "threads" in got["machine"]


# ---------------------------------------------------------------- the commands

def test_bench_json_has_the_fields_and_greedy_tokens(fp32, text_file):
    r = cli("bench", fp32, "--prompt-tokens", "8,20", "--new-tokens", "5", "--runs", "2", "--warmup", "0",
            "--threads", "1", "--text", text_file, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert {"cpu", "logical_cores", "memory_gib", "onnxruntime", "threads"} <= set(report["machine"])
    assert report["machine"]["threads"] == 1
    assert report["model"]["weights"] == "fp32" and "cpu" in report["model"]["device"]
    assert [x["prompt_tokens"] for x in report["results"]] == [8, 20]
    m = edge_infer.load(fp32, device="cpu")
    ids = m.tokenizer.encode(TEXT)
    for res in report["results"]:
        assert set(res["median"]) == set(measure.MEDIAN_FIELDS)
        assert len(res["runs"]) == 2
        for run in res["runs"]:
            assert run["prompt_tokens"] == res["prompt_tokens"] and run["new_tokens"] == 5
            assert run["prefill_tok_s"] > 0 and run["decode_tok_s"] > 0 and run["ttft_s"] > 0
        # the timed loop is plain greedy decoding: its tokens equal the runtime's own greedy generation
        steps = edge_infer.runtime.generate.decode_tokens(
            m, ids[:res["prompt_tokens"]], m.new_cache(), lambda logits, *_: int(np.argmax(logits)), 5)
        assert res["runs"][0]["first_tokens"] == list(steps)


def test_bench_speculative_alternates_with_plain_and_reports_acceptance(fp32, text_file):
    r = cli("bench", fp32, "--prompt-tokens", "40", "--new-tokens", "30", "--runs", "2", "--warmup", "0",
            "--threads", "1", "--text", text_file, "--speculative", "lookup", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["settings"]["speculative"] == {"mode": "lookup", "num_speculative": 10, "draft": None}
    (res,) = report["results"]
    spec = res["speculative"]
    assert len(spec["runs"]) == 2 and set(measure.MEDIAN_FIELDS) <= set(spec["median"])
    # fp32 greedy: the speculative ids are the plain ids, every run
    assert spec["identical_runs"] == 2 and spec["runs"][0]["first_tokens"] == res["runs"][0]["first_tokens"]
    assert 0.0 <= spec["acceptance_rate"] <= 1.0 and spec["tokens_per_target_pass"] >= 1.0
    table = cli("bench", fp32, "--prompt-tokens", "40", "--new-tokens", "10", "--runs", "1", "--text", text_file,
                "--speculative", "lookup")
    assert table.exit_code == 0 and "speculative lookup" in table.output and "identical ids" in table.output
    refused = cli("bench", fp32, "--prompt-tokens", "8", "--new-tokens", "4", "--text", text_file,
                  "--speculative", "draft")
    assert refused.exit_code == 2 and "needs a draft model" in refused.output


def test_bench_table_and_bad_inputs(fp32, text_file):
    r = cli("bench", fp32, "--prompt-tokens", "8", "--new-tokens", "3", "--runs", "1", "--text", text_file)
    assert r.exit_code == 0, r.output
    assert "decode tok/s" in r.output and "machine" in r.output
    too_long = cli("bench", fp32, "--prompt-tokens", "120", "--new-tokens", "20", "--text", text_file)
    assert too_long.exit_code == 2 and "max_length" in too_long.output
    bad = cli("bench", fp32, "--prompt-tokens", "12x", "--text", text_file)
    assert bad.exit_code == 2 and "128,1024" in bad.output
    missing = cli("bench", fp32, "--text", text_file.parent / "nope.txt", "--prompt-tokens", "8")
    assert missing.exit_code == 2 and "nope.txt" in missing.output


def test_eval_json_against_itself(fp32, text_file):
    r = cli("eval", fp32, "--text", text_file, "--reference", fp32, "--window", "64", "--stride", "32",
            "--max-tokens", "150", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output[r.output.index("{"):])
    assert report["tokens"] == 150 and report["scored"] == 149
    assert report["kl_mean"] == 0.0 and report["top1_agreement"] == 1.0
    assert report["perplexity"] == pytest.approx(report["reference_perplexity"])
    plain = cli("eval", fp32, "--text", text_file, "--window", "64", "--stride", "32", "--max-tokens", "150")
    assert plain.exit_code == 0 and f"{report['perplexity']:.4f}" in plain.output


def test_eval_bad_inputs_are_one_line_errors(fp32, text_file, tmp_path):
    r = cli("eval", fp32, "--text", text_file, "--window", "16", "--stride", "32")
    assert r.exit_code == 2 and "--stride 32" in r.output
    r = cli("eval", fp32, "--text", text_file, "--window", "512")
    assert r.exit_code == 2 and "max_length 128" in r.output
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    r = cli("eval", fp32, "--text", empty)
    assert r.exit_code == 2 and "empty" in r.output
    assert "Traceback" not in r.output


def test_benchmark_worker_times_edge_infer_in_its_own_process(fp32, tmp_path):
    """benchmarks/worker.py, which benchmarks/sidebyside.py runs once per engine and prompt."""
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps(list(range(3, 19))))
    worker = Path(__file__).resolve().parent.parent / "benchmarks" / "worker.py"
    out = subprocess.run([sys.executable, str(worker), "edge", str(fp32), "--ids", str(ids), "--new-tokens", "4",
                          "--threads", "1", "--runs", "2", "--warmup", "0"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["engine"] == "edge" and got["version"].startswith("edge-infer")
    assert [r["prompt_tokens"] for r in got["runs"]] == [16, 16]
    assert got["runs"][0]["first_tokens"] == got["runs"][1]["first_tokens"]  # a fresh cache per run
    assert got["rss_after_load_mib"] > 0
