"""Plain vs speculative decoding on the grounded task set, side by side in one run.

    G=$(.venv/bin/python -c 'from edge_infer.export.sources import default_model_path as p; print(p())')
    .venv/bin/edge-infer export $G -o /tmp/spec-int4 --quant int4 --force
    .venv/bin/edge-infer export $G -o /tmp/spec-fp32 --quant fp32 --force
    .venv/bin/python benchmarks/speculative/run.py --int4 /tmp/spec-int4 --fp32 /tmp/spec-fp32

Each task runs plain, speculative, speculative, plain (ABBA, so drift on a shared
machine cancels), greedy (one experiment samples), with the same max_tokens. Speed is decode tokens/s from
the stream's Timings (tokens after the first over their time), summed over tasks
per method; the table also gives each task's ratio, whether the ids equal plain
decoding's, and where they first differ. Writes RESULTS.md beside this file.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

import edge_infer
from edge_infer.runtime.generate import stream_generate
from edge_infer.runtime.speculative import SpeculativeConfig

HERE = Path(__file__).parent


@dataclass
class Run:
    ids: list[int]
    decode_tokens: int  # tokens after the first
    decode_time: float  # seconds
    wall: float  # seconds, request start to last chunk (prefill included)
    acceptance: float
    per_pass: float


def load_tasks(kind: str) -> list[tuple[str, list[dict]]]:
    spec = json.loads((HERE / "tasks.json").read_text(encoding="utf-8"))
    out = []
    for t in spec[kind]:
        content = t["instruction"]
        if "text" in t:
            content += "\n\n" + (HERE / "texts" / t["text"]).read_text(encoding="utf-8")
        if "source" in t:  # module:function of the standard library, from this interpreter's own source
            module, name = t["source"].split(":")
            content += "\n\n" + inspect.getsource(getattr(importlib.import_module(module), name))
        out.append((t["name"], [{"role": "user", "content": content}]))
    return out


def once(model, messages, max_tokens: int, spec, sampling: dict | None = None) -> Run:
    start = time.perf_counter()
    ids, last = [], None
    for chunk in stream_generate(model, messages, max_tokens=max_tokens, speculative=spec, **(sampling or {})):
        if chunk.token is not None:
            ids.append(chunk.token)
        last = chunk
    wall = time.perf_counter() - start
    t = last.timings
    n = t.generation_tokens - 1
    return Run(ids, n, n / t.decode_tokens_per_s if t.decode_tokens_per_s else 0.0, wall,
               t.acceptance_rate, t.tokens_per_target_pass)


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


QUICK = False  # --quick: one plain and one speculative run per task (AB, BA, ...) instead of ABBA


def compare(title: str, target, spec, tasks, max_tokens: int, sampling: dict | None = None) -> dict:
    """ABBA per task; returns rows and totals. `sampling`: sampling keywords (greedy when None)."""
    rows, plain_all, spec_all = [], [], []
    for name, messages in tasks:
        if QUICK and len(rows) % 2:  # one run each, the order alternating between tasks
            s1 = once(target, messages, max_tokens, spec, sampling)
            p1 = once(target, messages, max_tokens, None, sampling)
        else:
            p1 = once(target, messages, max_tokens, None, sampling)
            s1 = once(target, messages, max_tokens, spec, sampling)
        s2 = s1 if QUICK else once(target, messages, max_tokens, spec, sampling)
        p2 = p1 if QUICK else once(target, messages, max_tokens, None, sampling)
        plain, fast = ([p1], [s1]) if QUICK else ([p1, p2], [s2, s1])
        plain_all += plain
        spec_all += fast
        speed = lambda runs: sum(r.decode_tokens for r in runs) / sum(r.decode_time for r in runs)  # noqa: E731
        diff = first_difference(p1.ids, s1.ids)
        if diff is None:  # the first speculative run matched: did the second?
            diff = first_difference(p1.ids, s2.ids)
        rows.append({
            "task": name, "tokens": len(p1.ids), "plain": speed(plain), "spec": speed(fast),
            "ratio": speed(fast) / speed(plain), "wall_ratio": sum(r.wall for r in plain) / sum(r.wall for r in fast),
            "identical": diff is None, "first_diff": diff,
            "plain_stable": p1.ids == p2.ids, "acceptance": s1.acceptance, "per_pass": s1.per_pass,
            "sampled": sampling is not None, "spec_tokens": len(s1.ids),
        })
        print(f"  {title} {name}: plain {rows[-1]['plain']:.1f} tok/s, spec {rows[-1]['spec']:.1f} tok/s, "
              f"x{rows[-1]['ratio']:.2f}, identical {rows[-1]['identical']}", flush=True)
    total = lambda runs: sum(r.decode_tokens for r in runs) / sum(r.decode_time for r in runs)  # noqa: E731
    return {"title": title, "rows": rows, "plain": total(plain_all), "spec": total(spec_all),
            "ratio": total(spec_all) / total(plain_all),
            "geomean": float(np.exp(np.mean([np.log(r["ratio"]) for r in rows]))),
            "wall_ratio": sum(r.wall for r in plain_all) / sum(r.wall for r in spec_all)}


def pass_costs(model, widths=(1, 2, 3, 4, 6, 8, 12), reps: int = 12) -> dict[int, tuple[float, float]]:
    """Seconds of one target pass over w new tokens after 300 cached ones: (min, median) per width."""
    cache = model.new_cache(max_length=512)
    model.forward(np.arange(100, 400, dtype=np.int64)[None, :], cache)
    times: dict[int, list[float]] = {w: [] for w in widths}
    rng = np.random.default_rng(0)
    for _ in range(reps):
        for w in rng.permutation(widths):  # interleaved, so load changes hit every width alike
            cache.trim(300)
            x = np.arange(500, 500 + w, dtype=np.int64)[None, :]  # (1, w)
            start = time.perf_counter()
            model.forward(x, cache, logits_to_keep=int(w))
            times[int(w)].append(time.perf_counter() - start)
    return {w: (min(t), statistics.median(t)) for w, t in times.items()}


def table(result: dict) -> list[str]:
    lines = [f"### {result['title']}", "",
             f"Decode tok/s over all tasks: plain {result['plain']:.1f}, speculative {result['spec']:.1f}: "
             f"**x{result['ratio']:.2f}** (geometric mean of task ratios x{result['geomean']:.2f}; "
             f"end to end with prefill x{result['wall_ratio']:.2f}).", "",
             "| task | tokens | plain tok/s | spec tok/s | ratio | acceptance | tokens/target pass | ids = plain |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        same = "yes" if r["identical"] else f"no, from token {r['first_diff']}"
        if not r["plain_stable"]:
            same += " (plain itself unstable)"
        if r["sampled"]:  # the same seed draws differently when guesses are verified: only speed compares
            same = f"sampled ({r['spec_tokens']} tokens)"
        lines.append(f"| {r['task']} | {r['tokens']} | {r['plain']:.1f} | {r['spec']:.1f} | x{r['ratio']:.2f} | "
                     f"{r['acceptance']:.0%} | {r['per_pass']:.2f} | {same} |")
    return lines + [""]


def machine() -> str:
    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}, onnxruntime {ort.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--int4", required=True, help="int4 export of the default model (lookup target, draft)")
    ap.add_argument("--fp32", required=True, help="fp32 export of the default model (draft target)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--only", nargs="*",
                    default=["costs", "lookup", "lookup-fp32", "draft-only", "draft", "open", "open-sampled"],
                    help="experiments to run (default: all)")
    ap.add_argument("--per-session-threads", action="store_true",
                    help="give each model its own onnxruntime thread pool instead of one shared pool (a draft "
                         "and its target alternate: with a pool each, the idle one's spinning threads take "
                         "cores from the other)")
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--quick", action="store_true", help="one plain and one speculative run per task (AB/BA)")
    ap.add_argument("--speculative", default="lookup", choices=["auto", "lookup"],
                    help="the mode of the lookup experiments")
    args = ap.parse_args()
    global QUICK
    QUICK = args.quick
    shared = not args.per_session_threads
    int4 = edge_infer.load(args.int4, device="cpu", threads=args.threads, shared_threads=shared)
    fp32 = edge_infer.load(args.fp32, device="cpu", threads=args.threads, shared_threads=shared)
    draft = SpeculativeConfig("draft", draft=int4)  # draft model, plus lookup guesses when they promise more
    draft_only = SpeculativeConfig("draft", draft=int4, use_lookup=False)
    grounded, open_ended = load_tasks("grounded"), load_tasks("open")
    load_before = os.getloadavg()[0]
    started = time.strftime("%Y-%m-%d %H:%M")
    results, costs = [], {}
    if "costs" in args.only:
        costs = {"int4": pass_costs(int4), "fp32": pass_costs(fp32)}
    if "lookup" in args.only:
        results.append(compare(f"Prompt lookup ({args.speculative}), int4 target, grounded tasks", int4,
                               args.speculative, grounded, args.max_tokens))
    if "lookup-fp32" in args.only:
        results.append(compare("Prompt lookup, fp32 target, grounded tasks", fp32, "lookup", grounded,
                               args.max_tokens))
    if "draft-only" in args.only:
        results.append(compare("int4 draft (no lookup) for the fp32 target, grounded tasks", fp32, draft_only,
                               grounded, args.max_tokens))
    if "draft" in args.only:
        results.append(compare("int4 draft + lookup for the fp32 target, grounded tasks", fp32, draft, grounded,
                               args.max_tokens))
    if "open" in args.only:
        results.append(compare("Prompt lookup, int4 target, open-ended prompts", int4, "lookup", open_ended,
                               args.max_tokens))
        results.append(compare("int4 draft + lookup for the fp32 target, open-ended prompts", fp32, draft,
                               open_ended, args.max_tokens))
    if "open-sampled" in args.only:
        sampled = {"temperature": 0.8, "top_p": 0.95, "seed": 1}
        results.append(compare("Prompt lookup, int4 target, open-ended prompts, sampled (temperature 0.8, "
                               "top-p 0.95, seed 1)", int4, args.speculative, open_ended, args.max_tokens, sampled))

    lines = ["# Speculative decoding: plain vs speculative, side by side", "",
             f"Machine: {machine()}; {args.threads} threads; load average {load_before:.1f} at the start and "
             f"{os.getloadavg()[0]:.1f} at the end (the machine is shared). Run {started}."
             + (" Each model with its own thread pool (--per-session-threads)." if args.per_session_threads
                else " Both models on one shared onnxruntime thread pool."), "",
             "Model: SmolLM2-135M-Instruct (the default model), int4 and fp32 exports. Greedy, "
             f"max_tokens {args.max_tokens}, chat template. Command: "
             "`.venv/bin/python benchmarks/speculative/run.py --int4 INT4 --fp32 FP32`.", ""]
    if costs:
        widths = sorted(next(iter(costs.values())))
        lines += ["### Cost of one target pass by width (tokens fed at once, 300 cached)", "",
                  "Relative to a one-token pass: min over runs | median over runs.", "",
                  "| model | " + " | ".join(f"w={w}" for w in widths) + " |",
                  "|---|" + "---:|" * len(widths)]
        for name, c in costs.items():
            base_min, base_med = c[1]
            cells = [f"{c[w][0] / base_min:.2f} \\| {c[w][1] / base_med:.2f}" for w in widths]
            lines.append(f"| {name} ({base_min * 1000:.1f} ms at w=1) | " + " | ".join(cells) + " |")
        lines.append("")
    for r in results:
        lines += table(r)
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
