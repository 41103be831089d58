"""What the padding id costs plain decode: padded (2-row) vs unpadded steps, alternating, one process.

    .venv/bin/python benchmarks/pad_ab.py MODEL [--prompt-tokens 128] [--steps 64] [--rounds 4] [--threads 2]

Each round prefills the same prompt into a fresh cache and times --steps greedy decode steps
(Model.forward, one token) with `Model.pad_ids` True (every one-token step fed a padding id, so
the matmuls run two rows) and False, in alternating order (ABBA...). A graph that pads its
attention itself (in-graph padding) keeps doing so either way: this is the cost of the row.
Prints ms per step for each round, the ratio of the medians, and the padding the model chose.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import edge_infer
    from edge_infer.bench import measure
    from edge_infer.runtime.generate import prefill

    m = edge_infer.load(args.model, device="cpu", threads=args.threads)
    text, _ = measure.read_text()
    ids = measure.prompt_ids(m.tokenizer.encode(text), args.prompt_tokens)
    default = m.pad_ids  # what the load chose for this machine (Model.batch_invariant reports it verified)
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(args.rounds):
        for pad in (True, False) if r % 2 == 0 else (False, True):
            m.pad_ids = pad
            cache = m.new_cache(max_length=args.prompt_tokens + args.steps + 1)
            token = int(np.argmax(prefill(m, ids, cache)))
            start = time.perf_counter()
            for _ in range(args.steps):
                token = int(np.argmax(m.forward(np.array([[token]], dtype=np.int64), cache)[0, -1]))
            times[pad].append((time.perf_counter() - start) / args.steps * 1e3)
    m.pad_ids = default
    print(json.dumps({"default_pad_ids": default, "batch_invariant": m.batch_invariant,
                      "padded_ms": [round(x, 2) for x in times[True]],
                      "unpadded_ms": [round(x, 2) for x in times[False]],
                      "ratio_of_medians": round(float(np.median(times[True]) / np.median(times[False])), 3)}))


if __name__ == "__main__":
    main()
