"""What each batch invariance padding mode costs one plain decode step, side by side.

    .venv/bin/python benchmarks/padding_modes.py MODEL [--contexts 128,1024] [--steps 200] [--threads 2]

MODEL: an export whose graph pads its attention (every default export). Three variants of one
decode step (Model.forward, one token, logits_to_keep 1), interleaved step by step in one process
on one shared thread pool so a noisy machine slows all alike, at a fixed context (the cache is
trimmed back after every step):

  unpadded   the cache has no spare position, so the graph cannot pad: one row everywhere (not invariant)
  attention  padding="attention": the graph gives GroupQueryAttention a zero second row; matmuls keep one row
  rows       padding="rows": the previous id re-fed in front of the token, so every matmul runs two
             rows and the token stays last (the lm_head computes one logit row)
  rows-after padding="rows" with a padding id after the token instead (what a row without a known
             previous id gets): every matmul two rows, and the lm_head two logit rows

Prints the probe's verdict for this machine (which mode `auto` picks and why), then milliseconds per
step (median, p10) and the ratio to unpadded.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--contexts", default="128,1024")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import edge_infer
    from edge_infer.bench.measure import cpu_model, read_text

    # One shared thread pool: sessions with pools of their own spin on each other's cores.
    load = {p: edge_infer.load(args.model, device="cpu", threads=args.threads, shared_threads=True, padding=p)
            for p in ("auto", "attention", "rows")}
    variants = {"unpadded": load["attention"], "attention": load["attention"], "rows": load["rows"],
                "rows-after": load["rows"]}
    assert load["attention"].manifest.kv_layout == "shared", "MODEL must be a default-profile export"
    print(f"CPU: {cpu_model()}, {args.threads} threads, {args.steps} interleaved steps per variant")
    print(f"auto: {load['auto'].describe_padding()}\n")
    ids = load["auto"].tokenizer.encode(read_text(None)[0])
    print("| context | variant | ms per step, median | p10 | vs unpadded (median) |")
    print("|---:|---|---:|---:|---:|")
    for ctx in (int(c) for c in args.contexts.split(",")):
        caches = {}
        for name, m in variants.items():
            # unpadded: no position past the token, so the graph's padding row has no room
            caches[name] = m.new_cache(max_length=ctx + 1 if name == "unpadded" else ctx + 8)
            m.forward(np.array([ids[:ctx]]), caches[name])
        times: dict[str, list[float]] = {name: [] for name in variants}
        token = ids[ctx]
        for _ in range(args.steps):
            for name, m in variants.items():
                start = time.perf_counter()
                if name == "rows-after":  # pad=True: the padding id after the token, whatever is known
                    m.forward_rows([[token]], caches[name], keep=1, pad=True)
                else:
                    m.forward(np.array([[token]]), caches[name])
                times[name].append(time.perf_counter() - start)
                caches[name].trim(ctx)
        base = float(np.median(times["unpadded"]))
        for name, t in times.items():
            med = float(np.median(t))
            print(f"| {ctx} | {name} | {med * 1e3:.2f} | {np.percentile(t, 10) * 1e3:.2f} | x{med / base:.3f} |")


if __name__ == "__main__":
    main()
