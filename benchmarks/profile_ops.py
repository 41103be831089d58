"""Where a prefill or a decode step spends its time: onnxruntime's per-node profile, by op type.

    .venv/bin/python benchmarks/profile_ops.py MODEL [--prompt-tokens 1024] [--steps 64] [--threads 2]

Loads an edge-infer model with onnxruntime profiling on (the same session options as
`edge_infer.load`), runs one prefill (runtime.generate.prefill, chunked as users get it) and
--steps decode steps, and prints, separately for the prefill and the decode steps, each op
type's share of kernel time, the kernel time per run, and the wall time per run: the gap
between the two is what runs outside kernels (Python, IOBinding, onnxruntime's scheduling).
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-padding", action="store_true",
                    help="decode steps of one row (Model.pad_ids off): what the padding row costs, per op")
    args = ap.parse_args()

    import edge_infer
    import edge_infer.runtime.model as runtime_model
    from edge_infer.bench import measure
    from edge_infer.runtime.generate import prefill

    plain = runtime_model.cpu_session_options

    def profiled(threads=None, **kw):
        options = plain(threads, **kw)
        options.enable_profiling = True
        options.profile_file_prefix = "/tmp/edge-infer-profile"
        return options

    runtime_model.cpu_session_options = profiled
    m = edge_infer.load(args.model, device="cpu", threads=args.threads)
    if args.no_padding:
        m.pad_ids = False
    text, _ = measure.read_text()
    ids = measure.prompt_ids(m.tokenizer.encode(text), args.prompt_tokens)
    cache = m.new_cache(max_length=args.prompt_tokens + args.steps + 1)
    start = time.perf_counter()
    token = int(np.argmax(prefill(m, ids, cache)))
    prefill_wall = time.perf_counter() - start
    runs_before_decode = -(-len(ids) // 512)  # prefill chunks (runtime.generate.PREFILL_CHUNK)
    start = time.perf_counter()
    for _ in range(args.steps):
        token = int(np.argmax(m.forward(np.array([[token]], dtype=np.int64), cache)[0, -1]))
    decode_wall = (time.perf_counter() - start) / args.steps
    trace = json.loads(Path(m.session.end_profiling()).read_text())
    report(trace, runs_before_decode, prefill_wall, decode_wall, args)


def report(trace: list, prefill_runs: int, prefill_wall: float, decode_wall: float, args) -> None:
    runs = [e for e in trace if e.get("name") == "model_run"]
    # The first model_run events are the prefill chunks, the rest decode steps.
    bounds = [(e["ts"], e["ts"] + e["dur"]) for e in runs]
    phases = {"prefill": bounds[:prefill_runs], "decode": bounds[prefill_runs:]}
    for phase, spans in phases.items():
        by_op: dict = collections.Counter()
        nodes = 0
        for e in trace:
            if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
                continue
            if any(a <= e["ts"] <= b for a, b in spans):
                op = e["args"].get("op_name", "?")
                if "lm_head" in e["name"] or "embed" in e["name"]:  # the output projection apart from the layers
                    op += " (lm_head)"
                by_op[op] += e["dur"]
                nodes += 1
        total = sum(by_op.values())
        n = max(len(spans), 1)
        run_us = sum(b - a for a, b in spans) / n
        wall = prefill_wall * 1e6 if phase == "prefill" else decode_wall * 1e6
        print(f"\n{phase}: {len(spans)} run(s); per run: wall {wall / (n if phase == 'prefill' else 1) / 1e3:.2f} ms, "
              f"model_run {run_us / 1e3:.2f} ms, kernels {total / n / 1e3:.2f} ms, {nodes // n} kernel calls")
        for op, us in by_op.most_common(12):
            print(f"  {op:34s} {us / total * 100:5.1f}%  {us / n / 1e3:8.3f} ms/run")


if __name__ == "__main__":
    main()
