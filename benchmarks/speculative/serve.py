"""Speculative decoding through `edge-infer serve`: the grounded tasks, plain server vs speculative server.

    .venv/bin/python benchmarks/speculative/serve.py MODEL [--speculative lookup] [--draft DRAFT] [--rounds 2]

Starts two servers on loopback (one plain, one with --speculative), sends each grounded task of
tasks.json to both in turn (plain, speculative, speculative, plain: ABBA), one request at a time
(greedy, streaming), and writes a markdown table of decode tokens/s from SSE chunk times, the
ratio, whether the texts were identical, and the acceptance counted by the server's
/metrics. One request at a time is where the server speculates: with several decoding, its
batched step runs instead.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from run import load_tasks, machine  # noqa: E402
from serve_load import chat, start_server  # noqa: E402


async def ready(client: httpx.AsyncClient) -> None:
    while True:
        try:
            if (await client.get("/health")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.2)


async def accepted_counts(client: httpx.AsyncClient) -> dict[str, float]:
    text = (await client.get("/metrics")).text
    found = re.findall(r'edge_infer_speculative_tokens_total\{outcome="(\w+)"\} ([0-9.e+]+)', text)
    return {k: float(v) for k, v in found}


async def measure(args, plain_url: str, spec_url: str) -> list[dict]:
    rows = []
    async with httpx.AsyncClient(base_url=plain_url, timeout=600) as plain, \
            httpx.AsyncClient(base_url=spec_url, timeout=600) as spec:
        await ready(plain)
        await ready(spec)
        for name, messages in load_tasks("grounded"):
            runs = {"plain": [], "spec": []}
            before = await accepted_counts(spec)
            for r in range(args.rounds):
                for kind in (("plain", "spec") if r % 2 == 0 else ("spec", "plain")):
                    client = plain if kind == "plain" else spec
                    runs[kind].append(await chat(client, messages, args.max_tokens))
            after = await accepted_counts(spec)
            acc = after.get("accepted", 0) - before.get("accepted", 0)
            rej = after.get("rejected", 0) - before.get("rejected", 0)
            row = {"task": name, "tokens": len(runs["plain"][0].times),
                   "plain": statistics.median(x.decode_rate for x in runs["plain"]),
                   "spec": statistics.median(x.decode_rate for x in runs["spec"]),
                   "identical": all(x.text == runs["plain"][0].text for x in runs["plain"] + runs["spec"]),
                   "acceptance": acc / (acc + rej) if acc + rej else 0.0}
            print(f"  {name}: plain {row['plain']:.1f} tok/s, speculative {row['spec']:.1f} tok/s, "
                  f"identical {row['identical']}", file=sys.stderr)
            rows.append(row)
    return rows


async def measure_concurrent(args, plain_url: str, spec_url: str) -> list[dict]:
    """The grounded tasks in groups of `concurrency` requests sent together; per group and server the
    aggregate completion tokens over the wall time from the first request to the last token."""
    tasks = load_tasks("grounded")
    groups = [tasks[i:i + args.concurrency] for i in range(0, len(tasks), args.concurrency)]
    rows = []
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=plain_url, timeout=900, limits=limits) as plain, \
            httpx.AsyncClient(base_url=spec_url, timeout=900, limits=limits) as spec:
        await ready(plain)
        await ready(spec)
        for group in groups:
            rates, texts = {"plain": [], "spec": []}, {"plain": [], "spec": []}
            for r in range(args.rounds):
                for kind in (("plain", "spec") if r % 2 == 0 else ("spec", "plain")):
                    client = plain if kind == "plain" else spec
                    start = time.perf_counter()
                    results = await asyncio.gather(*(chat(client, m, args.max_tokens) for _, m in group))
                    wall = max(x.times[-1] for x in results) - start
                    rates[kind].append(sum((x.usage or {}).get("completion_tokens", len(x.times)) for x in results) / wall)
                    texts[kind].append([x.text for x in results])
            row = {"tasks": ", ".join(n for n, _ in group),
                   "plain": statistics.median(rates["plain"]), "spec": statistics.median(rates["spec"]),
                   "identical": all(t == texts["plain"][0] for t in texts["plain"] + texts["spec"])}
            print(f"  {row['tasks']}: plain {row['plain']:.1f} tok/s, speculative {row['spec']:.1f} tok/s, "
                  f"identical {row['identical']}", file=sys.stderr)
            rows.append(row)
    return rows


def concurrent_report(args, rows: list[dict], started: str) -> None:
    plain, spec = statistics.median(r["plain"] for r in rows), statistics.median(r["spec"] for r in rows)
    lines = ["# Speculative decoding through the server, concurrent requests", "",
             f"Machine: {machine()}; {args.threads} threads; load average {os.getloadavg()[0]:.1f} at the end "
             f"(shared machine: compare the ratio only). Run {started}. Model `{Path(args.model).name}`, "
             f"`edge-infer serve --parallel {args.concurrency} --speculative off` vs `--speculative "
             f"{args.speculative}`; {args.concurrency} grounded tasks sent at once, greedy, streaming, max_tokens "
             f"{args.max_tokens}, {args.rounds} rounds per group (ABBA), medians. Aggregate = completion tokens "
             "of the group / wall time from sending to the last token (prefill included).", "",
             f"Aggregate tok/s, median over groups: plain {plain:.1f}, speculative {spec:.1f}: **x{spec / plain:.2f}**.",
             "", "| tasks | plain tok/s | speculative tok/s | ratio | same texts |", "|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['tasks']} | {r['plain']:.1f} | {r['spec']:.1f} | x{r['spec'] / r['plain']:.2f} | "
                     f"{'yes' if r['identical'] else 'no'} |")
    lines += ["", f"Command: `.venv/bin/python benchmarks/speculative/serve.py {' '.join(sys.argv[1:])}`", ""]
    Path(args.out).write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--speculative", default="lookup", choices=["auto", "lookup", "draft"])
    ap.add_argument("--concurrency", type=int, default=1,
                    help="requests in flight at once (servers with --parallel N): the grounded tasks go N at a "
                         "time, and the aggregate completion tokens/s of each group is compared")
    ap.add_argument("--draft", default=None)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "SERVE.md"))
    args = ap.parse_args()
    extra = ("--speculative", args.speculative) + (("--draft", args.draft) if args.draft else ())
    started = time.strftime("%Y-%m-%d %H:%M")
    parallel = max(args.concurrency, 1)
    plain_proc, plain_url = start_server(args.model, parallel, 2048, 256, args.threads, ("--speculative", "off"))
    spec_proc, spec_url = start_server(args.model, parallel, 2048, 256, args.threads, extra)
    try:
        if args.concurrency > 1:
            return concurrent_report(args, asyncio.run(measure_concurrent(args, plain_url, spec_url)), started)
        rows = asyncio.run(measure(args, plain_url, spec_url))
    finally:
        for proc in (plain_proc, spec_proc):
            proc.terminate()
            proc.wait(timeout=30)
    total_plain = sum(r["tokens"] for r in rows) / sum(r["tokens"] / r["plain"] for r in rows)
    total_spec = sum(r["tokens"] for r in rows) / sum(r["tokens"] / r["spec"] for r in rows)
    lines = ["# Speculative decoding through the server", "",
             f"Machine: {machine()}; {args.threads} threads. Run {started}. Model `{Path(args.model).name}`, "
             f"`edge-infer serve --parallel 1` plain vs `--speculative {args.speculative}`"
             + (f" `--draft {Path(args.draft).name}`" if args.draft else "") + "; greedy, streaming, "
             f"max_tokens {args.max_tokens}, one request at a time, {args.rounds} rounds per task (ABBA), medians.",
             "", f"Decode tok/s over all tasks: plain {total_plain:.1f}, speculative {total_spec:.1f}: "
             f"**x{total_spec / total_plain:.2f}**.", "",
             "| task | tokens | plain tok/s | speculative tok/s | ratio | acceptance | same text |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['tokens']} | {r['plain']:.1f} | {r['spec']:.1f} | "
                     f"x{r['spec'] / r['plain']:.2f} | {r['acceptance']:.0%} | {'yes' if r['identical'] else 'no'} |")
    lines += ["", f"Command: `.venv/bin/python benchmarks/speculative/serve.py {' '.join(sys.argv[1:])}`", ""]
    Path(args.out).write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
