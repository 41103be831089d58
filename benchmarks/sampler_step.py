"""What one sampling step costs on a large vocabulary (the timing tests/test_sampling.py does not assert).

    .venv/bin/python benchmarks/sampler_step.py [--vocab 150000] [--context 2000] [--steps 200]

Times the sampler's __call__ (penalties, temperature, top-k, top-p, the draw) on random logits
over --vocab tokens with --context tokens of history, after one warm-up step, for three settings:
greedy, top-p alone, and every filter with penalties. Prints ms per step (median of --rounds).
The test checks the cost model (one pass over the vocab with top-k); this measures it on a machine.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

SETTINGS = {
    "greedy": {"temperature": 0.0},
    "top_p": {"temperature": 0.8, "top_p": 0.95, "seed": 0},
    "all": {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "repetition_penalty": 1.1,
            "frequency_penalty": 0.2, "seed": 0},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=150_000)
    ap.add_argument("--context", type=int, default=2_000)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    from edge_infer.bench.measure import describe_machine
    from edge_infer.runtime.sampling import SamplingParams, make_sampler

    x = np.random.default_rng(0).standard_normal(args.vocab).astype(np.float32) * 3  # (vocab,)
    tokens = np.random.default_rng(1).integers(0, args.vocab, args.context)  # (context,)
    result: dict = {"machine": describe_machine(), "vocab": args.vocab, "context": args.context}
    for name, params in SETTINGS.items():
        sampler = make_sampler(SamplingParams(**params))
        sampler(x, tokens, args.context // 2)  # warm-up
        rounds = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            for _ in range(args.steps):
                sampler(x, tokens, args.context // 2)
            rounds.append((time.perf_counter() - start) / args.steps * 1e3)
        result[f"{name}_ms"] = round(float(np.median(rounds)), 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
