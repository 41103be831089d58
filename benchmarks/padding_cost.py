"""What batch invariance costs one plain decode step, by how the one-token pass is padded.

    .venv/bin/python benchmarks/padding_cost.py OLD_EXPORT NEW_EXPORT [--steps 150] [--threads 2]

OLD_EXPORT: a default export made before the graph padded its own attention (no
`graph.attention_padding` in its manifest); NEW_EXPORT: the same source exported now. Three
variants of one decode step, interleaved step by step so a noisy machine slows all alike, at a
fixed context (the cache is trimmed back after every step):

  unpadded   OLD_EXPORT, Model.pad_ids off: one id, one row everywhere (not invariant)
  runtime    OLD_EXPORT: a padding id after the token (every matmul runs two rows, 2 logit rows)
  in-graph   NEW_EXPORT: one id; the graph gives only GroupQueryAttention a zero second row

Prints milliseconds per step (median and p10) and the ratio to unpadded.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--contexts", default="128,1024")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import edge_infer
    from edge_infer.bench.measure import cpu_model, read_text

    # One shared thread pool: three sessions with pools of their own spin on each other's cores.
    old, new, unpadded = (edge_infer.load(p, device="cpu", threads=args.threads, shared_threads=True)
                          for p in (args.old, args.new, args.old))
    unpadded.pad_ids = False
    assert new.pads_in_graph and not old.pads_in_graph, "NEW must pad in the graph, OLD must not"
    variants = {"unpadded": unpadded, "runtime": old, "in-graph": new}
    ids = old.tokenizer.encode(read_text(None)[0])
    print(f"CPU: {cpu_model()}, {args.threads} threads, {args.steps} interleaved steps per variant\n")
    print("| context | variant | ms per step, median | p10 | vs unpadded (median) |")
    print("|---:|---|---:|---:|---:|")
    for ctx in (int(c) for c in args.contexts.split(",")):
        caches = {}
        for name, m in variants.items():
            caches[name] = m.new_cache(max_length=ctx + 8)
            m.forward(np.array([ids[:ctx]]), caches[name])
        times: dict[str, list[float]] = {name: [] for name in variants}
        token = ids[ctx]
        for _ in range(args.steps):
            for name, m in variants.items():
                start = time.perf_counter()
                m.forward(np.array([[token]]), caches[name])
                times[name].append(time.perf_counter() - start)
                caches[name].trim(ctx)
        base = float(np.median(times["unpadded"]))
        for name, t in times.items():
            med = float(np.median(t))
            print(f"| {ctx} | {name} | {med * 1e3:.2f} | {np.percentile(t, 10) * 1e3:.2f} | x{med / base:.3f} |")


if __name__ == "__main__":
    main()
