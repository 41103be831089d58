"""edge-infer against onnxruntime-genai and llama.cpp, alternating, on identical prompt token ids.

    python3 benchmarks/peers.py setup                 # once: the peers' venvs and models
    .venv/bin/edge-infer export "$GGUF" -o /tmp/ei-int4 --force
    .venv/bin/python benchmarks/sidebyside.py /tmp/ei-int4 --rounds 5 --write

Each measurement is one fresh process (benchmarks/worker.py under the engine's own venv) that
loads the model, runs one untimed generation and one timed one: prefill of N prompt tokens, then
new-tokens - 1 greedy decode steps, eos ignored, with --threads threads. The order of engines
rotates every round, so slow phases of a shared machine spread over all of them; the table
reports medians over rounds and ratios of medians. --write writes benchmarks/RESULTS.md and
benchmarks/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "benchmarks" / "worker.py"
ENGINES = ("edge", "genai", "llamacpp")
LABEL = {"edge": "edge-infer", "genai": "onnxruntime-genai", "llamacpp": "llama.cpp"}
# Issue 3's targets: edge-infer / peer, higher is better except RSS (edge / genai <= 1).
TARGETS = {("decode_tok_s", "genai"): 1.2, ("decode_tok_s", "llamacpp"): 1.2,
           ("prefill_tok_s", "genai"): 1.5, ("prefill_tok_s", "llamacpp"): 2.0}


def busy_seconds() -> float:
    """CPU seconds spent busy by the whole machine since boot (Linux /proc/stat), 0 elsewhere."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_quiet(limit_s: float, threshold: float = 0.15) -> float:
    """Wait (up to limit_s) until other processes use under threshold of the machine; returns the share seen."""
    deadline = time.monotonic() + limit_s
    while True:
        before, t0 = busy_seconds(), time.monotonic()
        time.sleep(1.0)
        share = (busy_seconds() - before) / (time.monotonic() - t0) / (os.cpu_count() or 1)
        if share < threshold or time.monotonic() > deadline:
            return share
        time.sleep(2.0)


def run_worker(python: str, engine: str, model: str, ids_file: Path, args) -> dict:
    cmd = [python, str(WORKER), engine, model, "--ids", str(ids_file), "--new-tokens", str(args.new_tokens),
           "--threads", str(args.threads), "--runs", "1", "--warmup", str(args.warmup)]
    quiet_before = wait_quiet(args.wait_quiet) if args.wait_quiet else None
    busy0, t0 = busy_seconds(), time.monotonic()
    own0 = os.times()
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    own1 = os.times()
    if out.returncode:
        sys.exit(f"{engine} failed:\n{out.stderr[-3000:]}")
    got = json.loads(out.stdout.strip().splitlines()[-1])
    # CPU that other processes on the machine used meanwhile, in cores: a shared machine's noise, recorded.
    ours = sum(own1[:4]) - sum(own0[:4])
    got["others_cores"] = max(0.0, (busy_seconds() - busy0 - ours) / (time.monotonic() - t0))
    got["others_before"] = quiet_before
    return got


def prompts(model: str, lengths: list[int]) -> tuple[dict[int, list[int]], str]:
    import edge_infer
    from edge_infer.bench import measure

    text, desc = measure.read_text()
    ids = edge_infer.load(model, device="cpu", verify=False).tokenizer.encode(text)
    return {n: measure.prompt_ids(ids, n) for n in lengths}, f"{desc}, {len(ids)} tokens"


def median(rows: list[dict], field: str) -> float:
    return float(np.median([r[field] for r in rows]))


def load_avg() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return head + (" + uncommitted changes" if dirty else "")
    except OSError:
        return "?"


def measure_all(args, peers: dict, prompt_ids: dict[int, list[int]]) -> dict:
    python = {"edge": sys.executable, "genai": peers["genai_python"], "llamacpp": peers["llamacpp_python"],
              "edge2": sys.executable}
    model = {"edge": args.model, "genai": peers["genai_model"], "llamacpp": peers["gguf"], "edge2": args.compare}
    rows: dict = {(e, n): [] for e in ENGINES for n in prompt_ids}
    info = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for n, ids in prompt_ids.items():
            files[n] = Path(tmp) / f"ids{n}.json"
            files[n].write_text(json.dumps(ids))
        deadline = time.monotonic() + args.deadline_min * 60
        for r in range(args.rounds):
            if r and time.monotonic() > deadline:
                print(f"deadline reached: {r} complete rounds", flush=True)
                break
            order = ENGINES[r % len(ENGINES):] + ENGINES[:r % len(ENGINES)]
            for n in prompt_ids:
                for e in order:
                    for _ in range(args.retries + 1):  # a measurement others disturbed is redone
                        got = run_worker(python[e], e.rstrip("2"), model[e], files[n], args)
                        if got["others_cores"] <= args.max_others:
                            break
                        print(f"  redo {LABEL[e]} at {n}: others used {got['others_cores']:.2f} cores", flush=True)
                    run = dict(got["runs"][0], rss_after_load_mib=got["rss_after_load_mib"], load_s=got["load_s"],
                               others_cores=got["others_cores"])
                    rows[(e, n)].append(run)
                    info[e] = {"version": got["version"], "machine": got["machine"]}
                    print(f"round {r + 1}/{args.rounds} prompt {n:5d} {LABEL[e]:18s} prefill "
                          f"{run['prefill_tok_s']:7.1f} decode {run['decode_tok_s']:6.1f} tok/s  "
                          f"RSS {run['peak_rss_mib']:.0f} MiB  others {run['others_cores']:.2f} cores", flush=True)
    return {"rows": rows, "info": info}


def export_times(args, peers: dict) -> dict:
    """Alternating: `edge-infer export` of the GGUF (int4, with and without its validation) and
    genai's builder on the fp32 folder (int4 block 32, accuracy level 4). Wall seconds per round."""
    edge = str(Path(sys.executable).parent / "edge-infer")
    genai = [peers["genai_python"], "-m", "onnxruntime_genai.models.builder", "-i", peers["hf_fp32"], "-p", "int4",
             "-e", "cpu", "--extra_options", "block_size=32", "accuracy_level=4", "hf_token=false"]
    times: dict = {"edge-infer export": [], "edge-infer export --no-validate": [], "genai builder": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.export_rounds):
            jobs = [("edge-infer export", [edge, "export", peers["gguf"], "-o", f"{tmp}/e", "--force", "-q"]),
                    ("edge-infer export --no-validate",
                     [edge, "export", peers["gguf"], "-o", f"{tmp}/e", "--force", "-q", "--no-validate"]),
                    ("genai builder", genai + ["-o", f"{tmp}/g{r}", "-c", f"{tmp}/cache{r}"])]
            for name, cmd in jobs[r % 3:] + jobs[:r % 3]:
                start = time.perf_counter()
                subprocess.run(cmd, check=True, capture_output=True)
                times[name].append(time.perf_counter() - start)
                print(f"export round {r + 1}: {name} {times[name][-1]:.1f} s", flush=True)
    return times


def describe_export(folder: str) -> str:
    m = json.loads((Path(folder) / "manifest.json").read_text())
    q, src = m["quantization"], m["source"]
    return (f"{q.get('scheme')} block {q.get('block_size')} {'sym' if q.get('symmetric') else 'asym'}, "
            f"accuracy_level {q.get('accuracy_level')}, from {src.get('kind')} {src.get('name')}, "
            f"{q.get('summary', {}).get('quantized_nodes', '?')} MatMulNBits nodes"
            + (f", {q['gguf_q4_1']}" if q.get("gguf_q4_1") else ", no block-residual nodes"))


def summarize(rows: dict, lengths: list[int]) -> dict:
    fields = ("prefill_tok_s", "decode_tok_s", "ttft_s", "itl_p50_ms", "itl_p95_ms", "peak_rss_mib",
              "rss_after_load_mib", "load_s")
    return {(e, n): {f: median(rows[(e, n)], f) for f in fields} for e in ENGINES for n in lengths}


def markdown(args, meta: dict, med: dict, rows: dict, lengths: list[int]) -> str:
    m = meta["machine"]
    lines = [
        "# edge-infer vs onnxruntime-genai vs llama.cpp, side by side",
        "",
        f"Measured {meta['date']} by `benchmarks/sidebyside.py` (command below) at commit {meta['commit']}.",
        "",
        f"- Machine: {m['cpu']}, {m['logical_cores']} logical cores ({m['usable_cores']} usable), "
        f"{m['memory_gib']} GiB, {m['os']}, Python {m['python']}. Shared with other developers' jobs: "
        f"load average {meta['load_before']} before, {meta['load_after']} after (1/5/15 min).",
        f"- Model: SmolLM2-135M-Instruct, same weights for all three: {meta['edge_model']}; "
        f"onnxruntime-genai: its builder's int4 from the GGUF dequantized to fp32 ({meta['genai_options']}); "
        "llama.cpp: the original Q4_1 GGUF.",
        f"- Engines: {'; '.join(meta['versions'][e] for e in ENGINES if e != 'edge2')}; onnxruntime "
        f"{m['onnxruntime']} "
        "(edge-infer and genai).",
        f"- Workload: prompts of {', '.join(map(str, lengths))} tokens cut from {meta['text']} (identical ids "
        f"for every engine), {args.new_tokens} new tokens, greedy, eos ignored, {args.threads} threads, "
        f"batch 1. Each cell is the median of {meta['rounds_done']} rounds; every measurement is a fresh process "
        f"(load, {args.warmup} untimed generation of the same prompt with 8 new tokens, 1 timed), engines "
        "alternating in rotating order.",
        "- Prefill tok/s = prompt tokens / TTFT (prompt in to first token out); decode tok/s = "
        f"{args.new_tokens - 1} tokens / time from the first token to the last; peak RSS = the "
        "engine process's peak resident memory (after load: once the model is loaded, before any generation).",
        *([f"- Diagnostic row edge-infer ({Path(args.compare).name}): {meta['compare']}."] if args.compare else []),
        "",
        "| prompt | engine | prefill tok/s | decode tok/s | TTFT ms | ITL p50 / p95 ms | peak RSS MiB "
        "| RSS after load MiB | load s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in lengths:
        for e in ENGINES:
            d = med[(e, n)]
            lines.append(f"| {n} | {LABEL[e]} | {d['prefill_tok_s']:.0f} | {d['decode_tok_s']:.1f} | "
                         f"{d['ttft_s'] * 1e3:.0f} | {d['itl_p50_ms']:.2f} / {d['itl_p95_ms']:.2f} | "
                         f"{d['peak_rss_mib']:.0f} | {d['rss_after_load_mib']:.0f} | {d['load_s']:.2f} |")
    lines += ["", "## Ratios against issue 3's targets (edge-infer / peer, ratio of medians)", "",
              "| prompt | metric | vs onnxruntime-genai | target | vs llama.cpp | target |",
              "|---:|---|---:|---:|---:|---:|"]
    for n in lengths:
        for f, name in (("decode_tok_s", "decode tok/s"), ("prefill_tok_s", "prefill tok/s")):
            cells = []
            for peer in ("genai", "llamacpp"):
                ratio = med[("edge", n)][f] / med[(peer, n)][f]
                target = TARGETS[(f, peer)]
                cells += [f"{ratio:.2f}x", f"≥ {target}x {'met' if ratio >= target else '**missed**'}"]
            lines.append(f"| {n} | {name} | {' | '.join(cells)} |")
        rss = med[("edge", n)]["peak_rss_mib"] / med[("genai", n)]["peak_rss_mib"]
        rss_llama = med[("edge", n)]["peak_rss_mib"] / med[("llamacpp", n)]["peak_rss_mib"]
        lines.append(f"| {n} | peak RSS | {rss:.2f}x | ≤ 1x {'met' if rss <= 1 else '**missed**'} | "
                     f"{rss_llama:.2f}x | (none) |")
    e128, e1024 = (med[("edge", n)]["decode_tok_s"] for n in (lengths[0], lengths[-1]))
    lines += ["", f"Decode at {lengths[-1]} vs {lengths[0]} prompt tokens (edge-infer): {e1024 / e128:.2f} "
              f"(target ≥ 0.75: {'met' if e1024 / e128 >= 0.75 else '**missed**'}).", "",
              "## Every round", "",
              "Other processes' CPU use during each measurement is recorded (in cores, of "
              f"{meta['machine']['logical_cores']}); a measurement starts once they have used under 15% of the "
              f"machine for a second, or after {args.wait_quiet:.0f} s of waiting; one during which they used more "
              f"than {args.max_others} cores is redone (up to {args.retries} times).", "",
              "| prompt | engine | prefill tok/s per round | decode tok/s per round | others' cores per round |",
              "|---:|---|---|---|---|"]
    for n in lengths:
        for e in ENGINES:
            pre = ", ".join(f"{r['prefill_tok_s']:.0f}" for r in rows[(e, n)])
            dec = ", ".join(f"{r['decode_tok_s']:.1f}" for r in rows[(e, n)])
            others = ", ".join(f"{r['others_cores']:.2f}" for r in rows[(e, n)])
            lines.append(f"| {n} | {LABEL[e]} | {pre} | {dec} | {others} |")
    first = {e: rows[(e, lengths[0])][0]["first_tokens"] for e in ENGINES if e != "edge2"}
    if meta.get("export_times"):
        t = meta["export_times"]
        med_t = {k: float(np.median(v)) for k, v in t.items()}
        ratio = med_t["edge-infer export"] / med_t["genai builder"]
        lines += ["", "## Export time (default model, int4; seconds, median of "
                  f"{len(t['genai builder'])} alternating rounds)", "",
                  "| tool | seconds | per round |", "|---|---:|---|"]
        lines += [f"| {k} | {med_t[k]:.1f} | {', '.join(f'{x:.1f}' for x in v)} |" for k, v in t.items()]
        lines += ["", f"edge-infer export (with validation) / genai builder = {ratio:.2f} (target ≤ 1: "
                  f"{'met' if ratio <= 1 else '**missed**'}). The builder starts from the fp32 Hugging Face folder; "
                  "a genai user holding only the Q4_1 GGUF must first dequantize and save it with transformers "
                  f"4.57 (`benchmarks/peers.py`), which is not counted here."]
    lines += ["", f"First greedy tokens at {lengths[0]}: " + "; ".join(f"{LABEL[e]} {first[e]}" for e in first)
              + " (int4 variants of the same weights may pick different tokens; the work per step is the same).",
              "", "Command:", "", "```", meta["command"], "```", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="edge-infer model folder (the int4 export of the default model)")
    ap.add_argument("--peers", type=Path, default=Path(os.environ.get("PEERS_DIR", "/work/peers")))
    ap.add_argument("--prompt-tokens", default="128,1024")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--wait-quiet", type=float, default=60.0,
                    help="Before each measurement wait up to this many seconds for other processes to go idle.")
    ap.add_argument("--max-others", type=float, default=0.25,
                    help="Redo a measurement during which other processes used more cores than this.")
    ap.add_argument("--retries", type=int, default=2, help="Redos per measurement at most.")
    ap.add_argument("--deadline-min", type=float, default=60.0,
                    help="Start no new round after this many minutes (the table covers complete rounds).")
    ap.add_argument("--compare", default=None,
                    help="A second edge-infer model folder measured in the same alternation (a diagnostic row).")
    ap.add_argument("--export-rounds", type=int, default=0, help="Also time exports, alternating (rounds).")
    ap.add_argument("--write", action="store_true", help="Write benchmarks/RESULTS.md and results.json.")
    args = ap.parse_args()
    global ENGINES
    if args.compare:
        ENGINES = ENGINES + ("edge2",)
        LABEL["edge2"] = f"edge-infer ({Path(args.compare).name})"
    peers_file = args.peers / "peers.json"
    if not peers_file.exists():
        sys.exit(f"{peers_file} is missing: run `python3 benchmarks/peers.py setup --dir {args.peers}` first")
    peers = json.loads(peers_file.read_text())
    lengths = [int(x) for x in args.prompt_tokens.split(",")]
    prompt_ids, text = prompts(args.model, lengths)
    manifest = json.loads((Path(args.model) / "manifest.json").read_text())
    q = manifest["quantization"]
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": git_commit(),
            "load_before": load_avg(), "text": text, "genai_options": peers.get("genai_options", "?"),
            "edge_model": f"edge-infer `export` of the GGUF, {q.get('scheme')} block {q.get('block_size')} "
                          f"{'sym' if q.get('symmetric') else 'asym'}, embeddings {q.get('embeddings')}, "
                          f"lm_head {q.get('lm_head')}, accuracy_level {q.get('accuracy_level')}"
                          + (f" ({q['gguf_q4_1']})" if q.get("gguf_q4_1") else ""),
            "command": " ".join([".venv/bin/python", "benchmarks/sidebyside.py", *sys.argv[1:]]),
            "compare": describe_export(args.compare) if args.compare else None}
    started = time.perf_counter()
    got = measure_all(args, peers, prompt_ids)
    meta.update(load_after=load_avg(), versions={e: got["info"][e]["version"] for e in ENGINES},
                machine=got["info"]["edge"]["machine"], seconds=round(time.perf_counter() - started))
    if args.export_rounds:
        meta["export_times"] = export_times(args, peers)
    done = min(len(v) for v in got["rows"].values())
    got["rows"] = {k: v[:done] for k, v in got["rows"].items()}
    meta["rounds_done"] = done
    med = summarize(got["rows"], lengths)
    text_md = markdown(args, meta, med, got["rows"], lengths)
    print(text_md)
    if args.write:
        (REPO / "benchmarks" / "RESULTS.md").write_text(text_md)
        raw = {"meta": meta, "medians": {f"{e}@{n}": v for (e, n), v in med.items()},
               "runs": {f"{e}@{n}": v for (e, n), v in got["rows"].items()}}
        (REPO / "benchmarks" / "results.json").write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
