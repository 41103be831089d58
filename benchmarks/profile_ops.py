"""Where a prefill or a decode step spends its time: onnxruntime's per-node profile, by op type.

    .venv/bin/python benchmarks/profile_ops.py MODEL [--prompt-tokens 1024] [--steps 64] [--threads 2]

Loads an edge-infer model with onnxruntime profiling on (the same session options as
`edge_infer.load`), runs one prefill (runtime.generate.prefill, chunked as users get it) and
--steps decode steps, and prints, separately for the prefill and the decode steps, each op
type's share of kernel time, the kernel time per run, and the wall time per run: the gap
between the two is what runs outside kernels (Python, IOBinding, onnxruntime's scheduling).

For the decode steps it also splits MatMulNBits by weight shape (N x K) and sets each group's kernel
time against the bytes it reads (weights, scales, zero points, from the model file): the GB/s each
kernel reaches, to compare with a measured memory bandwidth (--bandwidth GB/s, e.g. sidebyside.py's).
--json FILE writes the numbers.
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
    ap.add_argument("--bandwidth", type=float, default=None, help="Measured read bandwidth, GB/s (1e9).")
    ap.add_argument("--json", type=Path, default=None, help="Also write the numbers here.")
    args = ap.parse_args()

    import edge_infer
    import edge_infer.runtime.model as runtime_model
    from edge_infer.bench import measure
    from edge_infer.runtime.generate import PREFILL_CHUNK, prefill

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
    runs_before_decode = -(-len(ids) // PREFILL_CHUNK)  # prefill chunks
    start = time.perf_counter()
    for _ in range(args.steps):
        token = int(np.argmax(m.forward(np.array([[token]], dtype=np.int64), cache)[0, -1]))
    decode_wall = (time.perf_counter() - start) / args.steps
    trace = json.loads(Path(m.session.end_profiling()).read_text())
    onnx_file = Path(args.model) / json.loads((Path(args.model) / "manifest.json").read_text())["graph"]["file"]
    out = report(trace, runs_before_decode, prefill_wall, decode_wall, args)
    out["matmulnbits"] = matmulnbits_groups(trace, onnx_file, out["decode_spans"], args)
    out.pop("decode_spans")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


def matmulnbits_groups(trace: list, onnx_file: Path, spans: list, args) -> list[dict]:
    """Decode steps: MatMulNBits kernel time per step by weight shape, against the bytes each reads."""
    import onnx
    from onnx import helper

    g = onnx.load(str(onnx_file), load_external_data=False).graph
    sizes = {}
    for t in g.initializer:
        count = int(np.prod(t.dims)) if t.dims else 1
        sizes[t.name] = count * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    shape, nbytes = {}, {}
    for node in g.node:
        if node.op_type == "MatMulNBits":
            a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
            shape[node.name] = (a["N"], a["K"])
            nbytes[node.name] = sum(sizes.get(i, 0) for i in node.input[1:])
    us: dict = collections.Counter()
    count: dict = collections.Counter()
    for e in trace:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if e["args"].get("op_name") != "MatMulNBits" or not any(a <= e["ts"] <= b for a, b in spans):
            continue
        name = e["name"][: -len("_kernel_time")]
        if name in shape:
            us[shape[name]] += e["dur"]
            count[shape[name]] += 1
    steps = max(len(spans), 1)
    groups = []
    print(f"\ndecode MatMulNBits by weight shape (N x K), per step ({onnx_file.name}):")
    for key in sorted(us, key=lambda k: -us[k]):
        nodes = sum(1 for v in shape.values() if v == key)
        mb = sum(nbytes[n] for n, v in shape.items() if v == key) / 1e6
        ms = us[key] / steps / 1e3
        gbs = mb / ms  # MB per ms = GB/s
        frac = f", {gbs / args.bandwidth:.0%} of {args.bandwidth} GB/s" if args.bandwidth else ""
        print(f"  {key[0]:6d} x {key[1]:5d}: {nodes:3d} nodes, {mb:7.1f} MB, {ms:7.3f} ms/step, {gbs:5.2f} GB/s{frac}")
        groups.append({"N": key[0], "K": key[1], "nodes": nodes, "mb": round(mb, 2), "ms_per_step": round(ms, 3),
                       "gb_s": round(gbs, 2), "calls": count[key]})
    total_mb, total_ms = sum(x["mb"] for x in groups), sum(x["ms_per_step"] for x in groups)
    if total_ms:
        frac = f", {total_mb / total_ms / args.bandwidth:.0%} of {args.bandwidth} GB/s" if args.bandwidth else ""
        print(f"  all: {total_mb:.1f} MB in {total_ms:.2f} ms/step = {total_mb / total_ms:.2f} GB/s{frac}")
    return groups


def report(trace: list, prefill_runs: int, prefill_wall: float, decode_wall: float, args) -> dict:
    runs = [e for e in trace if e.get("name") == "model_run"]
    # The first model_run events are the prefill chunks, the rest decode steps.
    bounds = [(e["ts"], e["ts"] + e["dur"]) for e in runs]
    phases = {"prefill": bounds[:prefill_runs], "decode": bounds[prefill_runs:]}
    out: dict = {"decode_spans": phases["decode"], "prompt_tokens": args.prompt_tokens, "steps": args.steps,
                 "threads": args.threads}
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
        out[phase] = {"runs": len(spans), "wall_ms": wall / (n if phase == "prefill" else 1) / 1e3,
                      "model_run_ms": run_us / 1e3, "kernels_ms": total / n / 1e3, "kernel_calls": nodes // n,
                      "by_op": {op: {"share": us / total, "ms_per_run": us / n / 1e3} for op, us in by_op.most_common()}}
    return out


if __name__ == "__main__":
    main()
