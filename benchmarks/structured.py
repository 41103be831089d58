"""Structured output: what the grammar mask costs, against the decode step it rides on.

    .venv/bin/python benchmarks/structured.py MODEL_FOLDER [--rounds 3] [--json out.json]

1. Mask cost per step (llguidance fill + applying the bitmask to a float32 logits row), over the tokens
   of real constrained outputs (the suite in tests/schemas_suite.py), at the model's vocabulary (49,152
   for the default model) and at a synthetic 128k vocabulary (the model's tokenizer.json padded with
   79k extra byte-level tokens made by joining pairs of its own tokens, so the trie has realistic shape).
2. Decode through the server's engine (continuous batching; speculation off), constrained vs free, at
   batch 1 and batch 8: tokens/s and the engine's step time. In the batched step the masks are computed
   on a helper thread while the model runs, so only the part not hidden and the apply stay on the path.

Only ratios measured side by side in one run mean anything on a shared machine; the CPU is printed.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import edge_infer  # noqa: E402
from edge_infer.runtime.constrain import MaskPool, apply_mask, constraint_from  # noqa: E402
from edge_infer.runtime.sampling import SamplingParams  # noqa: E402
from edge_infer.serve.config import EngineConfig  # noqa: E402
from edge_infer.serve.engine import Engine  # noqa: E402
from edge_infer.serve.request import Finished, GenerationRequest  # noqa: E402
from schemas_suite import SUITE  # noqa: E402

LONG = {"type": "object", "properties": {"rows": {"type": "array", "minItems": 12, "maxItems": 12, "items": {
    "type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                     "name": {"type": "string", "maxLength": 12},
                                     "ok": {"type": "boolean"}},
    "required": ["id", "name", "ok"], "additionalProperties": False}}}, "required": ["rows"],
    "additionalProperties": False}


def cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001
        return platform.processor() or "unknown"


def fmt(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}


def outputs(model, n: int) -> list[tuple[dict, list[int]]]:
    """(schema, token ids) of the model's own constrained replies to the first n suite prompts."""
    out = []
    for prompt, schema in SUITE[:n]:
        chunks = list(edge_infer.stream_generate(model, [{"role": "user", "content": prompt + " Answer in JSON."}],
                                                 max_tokens=120, response_format=fmt(schema)))
        out.append((schema, [c.token for c in chunks if c.token is not None]))
    return out


class _Tok:
    """A stand-in for Model in constraint_from/matcher: just what grammar_tokenizer needs."""

    def __init__(self, llg_tokenizer, vocab: int):
        self._grammar_tokenizer = llg_tokenizer
        self.manifest = type("M", (), {"geometry": type("G", (), {"vocab_size": vocab})()})()


def mask_cost(tok_model, trajectories, vocab: int, rounds: int) -> dict:
    """Per-step ms of fill (llguidance) and apply (numpy), over the trajectories' steps."""
    fills, applies, fill_cpu = [], [], []
    logits = np.random.default_rng(0).standard_normal(vocab).astype(np.float32)  # (vocab,)
    for _ in range(rounds):
        for schema, ids in trajectories:
            m = constraint_from(fmt(schema), model=tok_model).matcher(tok_model)
            for t in ids:
                c0 = time.thread_time()
                t0 = time.perf_counter()
                m.fill()
                t1 = time.perf_counter()
                fill_cpu.append(time.thread_time() - c0)
                apply_mask(logits, m.bitmask[0])
                t2 = time.perf_counter()
                fills.append(t1 - t0)
                applies.append(t2 - t1)
                if t in m.eos or not m._m.consume_token(int(t)):
                    break
    return {"steps": len(fills), "fill_ms_median": 1e3 * statistics.median(fills),
            "fill_ms_mean": 1e3 * statistics.fmean(fills), "fill_ms_p95": 1e3 * sorted(fills)[int(.95 * len(fills))],
            "apply_ms_median": 1e3 * statistics.median(applies),
            "fill_cpu_ms_mean": 1e3 * statistics.fmean(fill_cpu)}


def decode_step(model, steps: int = 60) -> dict:
    """One-token decode steps at about 200 tokens of context: wall and CPU (all threads) ms per step."""
    cache = model.new_cache()
    ids = model.tokenizer.encode("The history of the city. " * 40, add_special_tokens=False)[:200]
    model.forward(np.array([ids], dtype=np.int64), cache)
    walls, cpus = [], []
    token = 42
    for _ in range(steps):
        c0, t0 = time.process_time(), time.perf_counter()
        model.forward(np.array([[token]], dtype=np.int64), cache)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return {"wall_ms_median": 1e3 * statistics.median(walls), "cpu_ms_median": 1e3 * statistics.median(cpus)}


def synthetic_tokenizer(src: Path, size: int, dst: Path) -> Path:
    """src's tokenizer.json with extra vocabulary entries (joined pairs of existing tokens) up to `size`."""
    data = json.loads(src.read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    words = [w for w in vocab if len(w) > 1]
    rng = random.Random(0)
    i = max(max(vocab.values()), *(t["id"] for t in data.get("added_tokens", []))) + 1
    while i < size:
        w = rng.choice(words) + rng.choice(words)
        if w not in vocab:
            vocab[w] = i
            i += 1
    dst.write_text(json.dumps(data), encoding="utf-8")
    return dst


def engine_run(model, batch: int, response_format, max_tokens: int) -> dict:
    """`batch` identical-length requests at once through the engine: aggregate tok/s and step time."""
    engine = Engine(model, EngineConfig(parallel=batch, max_length=512, prefill_chunk=256))
    engine.start()
    try:
        prompts = [f"Request {i}: list twelve rows of made-up records as JSON." for i in range(batch)]
        constraint = constraint_from(response_format, model=model) if response_format else None
        done = threading.Event()
        results: list[Finished] = []

        def emit(event) -> None:  # on the engine thread: never block it
            if not hasattr(event, "text"):
                results.append(event)
                if len(results) == batch:
                    done.set()

        ids = [edge_infer.runtime.generate.encode_prompt(model, [{"role": "user", "content": p}]) for p in prompts]
        t0 = time.perf_counter()
        for i in range(batch):
            engine.submit(GenerationRequest(tuple(ids[i]), max_tokens, SamplingParams(), (), f"r{i}",
                                            constraint=constraint), emit)
        done.wait()
        wall = time.perf_counter() - t0
    finally:
        engine.stop()
    tokens = sum(r.usage.completion_tokens for r in results)
    per_request = statistics.fmean(r.decode_tokens_per_s for r in results)
    return {"batch": batch, "tokens": tokens, "wall_s": wall, "aggregate_tok_s": tokens / wall,
            "decode_tok_s_per_request": per_request, "step_ms": 1e3 / per_request if per_request else 0.0,
            "finish": sorted({r.finish_reason for r in results})}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--schemas", type=int, default=12)
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-engine", action="store_true", help="Only the mask and decode-step costs.")
    a = ap.parse_args()
    model = edge_infer.load(a.model, device="cpu")
    import llguidance

    result = {"cpu": cpu(), "model": str(a.model), "vocab": model.manifest.geometry.vocab_size}
    print(f"CPU: {result['cpu']}; model {a.model}, vocabulary {result['vocab']}")
    traj = outputs(model, a.schemas)
    print(f"{len(traj)} constrained replies, {sum(len(t) for _, t in traj)} tokens")
    from edge_infer.runtime.constrain import grammar_tokenizer

    result["decode_step"] = decode_step(model)
    print("decode step:", result["decode_step"])
    result["mask_49k"] = mask_cost(model, traj, result["vocab"], a.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        big = synthetic_tokenizer(Path(a.model) / model.manifest.tokenizer.file, 128_256, Path(tmp) / "t.json")
        t0 = time.perf_counter()
        tok128 = llguidance.LLTokenizer(str(big), n_vocab=128_256, eos_token=sorted(model.tokenizer.eos_ids))
        result["tokenizer_128k_build_s"] = time.perf_counter() - t0
        result["mask_128k"] = mask_cost(_Tok(tok128, 128_256), traj, 128_256, a.rounds)
    print("mask 49k:", result["mask_49k"])
    print("mask 128k:", result["mask_128k"])
    # batch-8 masks on llguidance's pool (what the engine's helper thread runs)
    ms = [constraint_from(fmt(LONG), model=model).matcher(model) for _ in range(8)]
    pool = MaskPool()
    bitmask = np.full((8, (result["vocab"] + 31) // 32), -1, dtype=np.int32)
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        pool.fill(ms, bitmask)
        times.append(time.perf_counter() - t0)
    pool.close()
    result["mask_batch8_pool_ms_median"] = 1e3 * statistics.median(times)
    grammar_tokenizer(model)
    runs = []
    for rnd in range(0 if a.no_engine else a.rounds):  # alternate, so drift on a shared machine hits both sides
        for batch in (1, 8):
            for rf in (None, fmt(LONG)):
                r = engine_run(model, batch, rf, 128)
                r["constrained"] = rf is not None
                r["round"] = rnd
                runs.append(r)
                print(r)
    result["engine"] = runs
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
