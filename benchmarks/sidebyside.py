"""edge-infer against onnxruntime-genai and llama.cpp, alternating, on identical prompt token ids.

    python3 benchmarks/peers.py setup                 # once: the peers' venvs and models
    .venv/bin/edge-infer export "$GGUF" -o /tmp/ei-int4 --force
    .venv/bin/python benchmarks/sidebyside.py /tmp/ei-int4 --rounds 5 --write

Each measurement is one fresh process (benchmarks/worker.py under the engine's own venv) that
loads the model, runs one untimed generation and one timed one: prefill of N prompt tokens, then
new-tokens - 1 greedy decode steps, eos ignored, with --threads threads. The order of engines
rotates every round, so slow phases of a shared machine spread over all of them; the table
reports medians over rounds and ratios of medians. --write writes benchmarks/RESULTS.md and
benchmarks/results.json (--out / --json-out elsewhere).

Another model than the peers' default one (the 1B-class model of benchmarks/big_model.py):

    .venv/bin/python benchmarks/big_model.py /tmp/big                  # hf/ + model.Q4_0.gguf
    .venv/bin/edge-infer export /tmp/big/model.Q4_0.gguf -o /tmp/big-ei
    PEERS/genai-venv/bin/python -m onnxruntime_genai.models.builder -i /tmp/big/hf -o /tmp/big-genai \
        -p int4 -e cpu --extra_options block_size=32 accuracy_level=4 hf_token=false
    .venv/bin/python benchmarks/sidebyside.py /tmp/big-ei --gguf /tmp/big/model.Q4_0.gguf \
        --genai-model /tmp/big-genai --model-name "1B-class" --targets issue12-1b --bandwidth \
        --grounded --rounds 2 --out benchmarks/RESULTS_1B.md --json-out benchmarks/results_1b.json

--bandwidth measures the machine's memory bandwidth once per round (numpy over a 512 MiB array,
--threads threads, in this process while no engine runs) and reports each engine's fraction of it:
the bytes of weights one decode step reads (from the model files: every weight tensor but the
rows an embedding lookup skips) x decode tok/s / bandwidth. --grounded adds the grounded task
set of benchmarks/speculative: edge-infer plain, edge-infer `--speculative auto` and llama.cpp
plain decode on the same chat-template ids (one process per engine per round, all tasks in it);
--task-set code runs the code-editing set instead (benchmarks/speculative/tasks.json "code").
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

from bandwidth import bandwidth_section, memory_bandwidth, weight_bytes  # this folder (the script's own path)
from targets import issue3_ratios, targets_1b

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "benchmarks" / "worker.py"
ENGINES = ("edge", "genai", "llamacpp")
LABEL = {"edge": "edge-infer", "genai": "onnxruntime-genai", "llamacpp": "llama.cpp"}
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


def run_worker(python: str, engine: str, model: str, ids_file: Path, args, extra: list[str] = ()) -> dict:
    cmd = [python, str(WORKER), engine, model, "--ids", str(ids_file), "--new-tokens", str(args.new_tokens),
           "--threads", str(args.threads), "--runs", "1", "--warmup", str(args.warmup), *extra]
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


def prompts(model: str, lengths: list[int], new_tokens: int = 128, grounded: bool = False,
            task_set: str = "grounded") -> tuple:
    """(prompt ids per length, text description, grounded task ids or None, edge-infer's KV cache MiB
    per length: what it preallocates for prompt + new tokens)."""
    import edge_infer
    from edge_infer.bench import measure

    text, desc = measure.read_text()
    m = edge_infer.load(model, device="cpu", verify=False, threads=1)
    ids = m.tokenizer.encode(text)
    kv = {}
    for n in lengths:
        cache = m.new_cache(max_length=min(n + new_tokens, m.max_length))
        kv[n] = sum(a.nbytes for a in [*cache.keys, *cache.values]) / 2**20
        del cache
    tasks = grounded_ids(m, task_set) if grounded else None
    return {n: measure.prompt_ids(ids, n) for n in lengths}, f"{desc}, {len(ids)} tokens", tasks, kv


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
    model = {"edge": args.model, "genai": args.genai_model or peers["genai_model"],
             "llamacpp": args.gguf or peers["gguf"], "edge2": args.compare}
    rows: dict = {(e, n): [] for e in ENGINES for n in prompt_ids}
    info: dict = {"bandwidth": []}
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
            if args.bandwidth:
                if args.wait_quiet:
                    wait_quiet(args.wait_quiet)
                info["bandwidth"].append(dict(memory_bandwidth(args.threads), load=load_avg()))
                print(f"round {r + 1}: memory bandwidth {info['bandwidth'][-1]}", flush=True)
            for n in prompt_ids:
                for e in order:
                    for attempt in range(args.retries + 1):  # a measurement others disturbed is redone
                        got = run_worker(python[e], e.rstrip("2"), model[e], files[n], args)
                        if got["others_cores"] <= args.max_others:
                            break
                        if attempt < args.retries:
                            print(f"  redo {LABEL[e]} at {n}: others used {got['others_cores']:.2f} cores", flush=True)
                    run = dict(got["runs"][0], rss_after_load_mib=got["rss_after_load_mib"], load_s=got["load_s"],
                               others_cores=got["others_cores"], load_avg=load_avg())
                    rows[(e, n)].append(run)
                    info[e] = {"version": got["version"], "machine": got["machine"]}
                    print(f"round {r + 1}/{args.rounds} prompt {n:5d} {LABEL[e]:18s} prefill "
                          f"{run['prefill_tok_s']:7.1f} decode {run['decode_tok_s']:6.1f} tok/s  "
                          f"RSS {run['peak_rss_mib']:.0f} MiB  others {run['others_cores']:.2f} cores  "
                          f"load {load_avg()}", flush=True)
    return {"rows": rows, "info": info}


# ---------------------------------------------------------------- memory bandwidth and bytes per token

# ---------------------------------------------------------------- the grounded set: speculation vs plain

GROUNDED = ("edge", "edge-spec", "llamacpp")
GLABEL = {"edge": "edge-infer plain", "edge-spec": "edge-infer --speculative auto", "llamacpp": "llama.cpp plain"}


def grounded_ids(model, task_set: str = "grounded") -> dict[str, list[int]]:
    """The tasks of one set of benchmarks/speculative/tasks.json as chat-template ids (edge-infer's tokenizer)."""
    sys.path.insert(0, str(REPO / "benchmarks" / "speculative"))
    from run import load_tasks

    from edge_infer.runtime.generate import encode_prompt

    return {name: encode_prompt(model, messages) for name, messages in load_tasks(task_set)}


def measure_grounded(args, peers: dict, tasks: dict[str, list[int]]) -> dict:
    """Per round, one process per engine runs every task (rotating engine order)."""
    python = {"edge": sys.executable, "edge-spec": sys.executable, "llamacpp": peers["llamacpp_python"]}
    model = {"edge": args.model, "edge-spec": args.model, "llamacpp": args.gguf or peers["gguf"]}
    rows: dict = {e: [] for e in GROUNDED}
    with tempfile.TemporaryDirectory() as tmp:
        ids_file = Path(tmp) / "tasks.json"
        ids_file.write_text(json.dumps(tasks))
        for r in range(args.rounds):
            order = GROUNDED[r % 3:] + GROUNDED[:r % 3]
            for e in order:
                extra = ["--speculative", "auto"] if e == "edge-spec" else []
                got = run_worker(python[e], e.split("-")[0], model[e], ids_file, args, extra)
                runs = got["runs"]
                decode_time = sum((x["new_tokens"] - 1) / x["decode_tok_s"] for x in runs)
                total = {"decode_tok_s": sum(x["new_tokens"] - 1 for x in runs) / decode_time,
                         "others_cores": got["others_cores"], "load": load_avg(), "runs": runs}
                if e == "edge-spec":
                    total["proposed"] = sum(x["proposed"] for x in runs)
                    total["accepted"] = sum(x["accepted"] for x in runs)
                rows[e].append(total)
                print(f"grounded round {r + 1}/{args.rounds} {GLABEL[e]:30s} decode {total['decode_tok_s']:6.1f} tok/s"
                      f"  others {got['others_cores']:.2f} cores  load {total['load']}", flush=True)
    return rows


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
        f"load average {meta['load_before']} before, {meta['load_after']} after" + (f", {meta['load_after_grounded']} after the grounded set" if meta.get('load_after_grounded') else "") + " (1/5/15 min).",
        f"- Model: {meta['model_name']}, same weights for all three: {meta['edge_model']}; "
        f"onnxruntime-genai: its builder's int4 from {meta['genai_source']} ({meta['genai_options']}); "
        f"llama.cpp: {meta['llama_source']}.",
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
    if args.targets == "issue12-1b":
        lines += targets_1b(meta, med, lengths, grounded_totals(meta) if meta.get("grounded") else None)
    if meta.get("bandwidth"):
        lines += bandwidth_section(args, meta, med, lengths, LABEL)
    if meta.get("grounded"):
        lines += grounded_section(args, meta)
    if args.targets == "issue3":
        lines += issue3_ratios(med, lengths)
    e128, e1024 = (med[("edge", n)]["decode_tok_s"] for n in (lengths[0], lengths[-1]))
    lines += ["", f"Decode at {lengths[-1]} vs {lengths[0]} prompt tokens (edge-infer): {e1024 / e128:.2f} "
              f"(target ≥ 0.75: {'met' if e1024 / e128 >= 0.75 else '**missed**'}).", "",
              "## Every round", "",
              "Other processes' CPU use during each measurement is recorded (in cores, of "
              f"{meta['machine']['logical_cores']}); a measurement starts once they have used under 15% of the "
              f"machine for a second, or after {args.wait_quiet:.0f} s of waiting; one during which they used more "
              f"than {args.max_others} cores is redone (up to {args.retries} times).", "",
              "| prompt | engine | prefill tok/s per round | decode tok/s per round | others' cores per round "
              "| load average after each (1/5/15 min) |",
              "|---:|---|---|---|---|---|"]
    for n in lengths:
        for e in ENGINES:
            pre = ", ".join(f"{r['prefill_tok_s']:.0f}" for r in rows[(e, n)])
            dec = ", ".join(f"{r['decode_tok_s']:.1f}" for r in rows[(e, n)])
            others = ", ".join(f"{r['others_cores']:.2f}" for r in rows[(e, n)])
            loads = "; ".join(r.get("load_avg", "?") for r in rows[(e, n)])
            lines.append(f"| {n} | {LABEL[e]} | {pre} | {dec} | {others} | {loads} |")
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


def grounded_totals(meta: dict) -> dict:
    """Per engine: decode tok/s over all grounded tasks per round, and its median."""
    g = meta["grounded"]
    return {e: {"rounds": [r["decode_tok_s"] for r in g[e]],
                "median": float(np.median([r["decode_tok_s"] for r in g[e]]))} for e in GROUNDED}


def grounded_section(args, meta: dict) -> list[str]:
    g, t = meta["grounded"], grounded_totals(meta)
    tasks = [r["task"] for r in g["edge"][0]["runs"]]
    lines = ["", f"## Speculation on the {args.task_set} set (benchmarks/speculative, chat template, "
             f"{args.new_tokens} new tokens, greedy, eos ignored)", "",
             "One process per engine per round runs all tasks (one warmup on the first); engines alternate in "
             "rotating order. Decode tok/s over all tasks = their decode tokens / their decode time.", "",
             "| engine | decode tok/s (median) | per round | vs llama.cpp plain | vs edge-infer plain |",
             "|---|---:|---|---:|---:|"]
    for e in GROUNDED:
        lines.append(f"| {GLABEL[e]} | {t[e]['median']:.1f} | {', '.join(f'{x:.1f}' for x in t[e]['rounds'])} | "
                     f"{t[e]['median'] / t['llamacpp']['median']:.2f}x | {t[e]['median'] / t['edge']['median']:.2f}x |")
    spec = g["edge-spec"]
    proposed, accepted = sum(r["proposed"] for r in spec), sum(r["accepted"] for r in spec)
    same = [all(a["ids"] == b["ids"] for a, b in zip(p["runs"], q["runs"])) for p in g["edge"] for q in spec]
    lines += ["", f"Lookup acceptance: {accepted} of {proposed} guesses ({accepted / max(proposed, 1):.0%}) over "
              f"{len(spec)} rounds of {len(tasks)} tasks. Speculative ids equal edge-infer plain decoding's on "
              f"{sum(same)} of {len(same)} (plain round, speculative round) pairs over all tasks.", "",
              "| task | prompt tokens | edge-infer plain | --speculative auto | llama.cpp plain | acceptance | "
              "tokens per target pass | ids = plain |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for i, task in enumerate(tasks):
        cell = {e: float(np.median([r["runs"][i]["decode_tok_s"] for r in g[e]])) for e in GROUNDED}
        s0 = spec[0]["runs"][i]
        per_pass = (s0["new_tokens"] - 1) / max(s0["target_passes"], 1)
        identical = all(p["runs"][i]["ids"] == q["runs"][i]["ids"] for p in g["edge"] for q in spec)
        lines.append(f"| {task} | {s0['prompt_tokens']} | {cell['edge']:.1f} | {cell['edge-spec']:.1f} | "
                     f"{cell['llamacpp']:.1f} | {s0['acceptance']:.0%} | {per_pass:.2f} | "
                     f"{'yes' if identical else 'no'} |")
    return lines


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
    ap.add_argument("--gguf", default=None, help="llama.cpp's GGUF (default: peers.json's, the default model).")
    ap.add_argument("--genai-model", default=None, help="onnxruntime-genai's model folder (default: peers.json's).")
    ap.add_argument("--model-name", default="SmolLM2-135M-Instruct", help="The model's name in the table.")
    ap.add_argument("--genai-source", default="the GGUF dequantized to fp32",
                    help="What genai's builder read, in the table.")
    ap.add_argument("--targets", choices=["issue3", "issue12-1b"], default="issue3",
                    help="The targets the ratio table checks.")
    ap.add_argument("--bandwidth", action="store_true",
                    help="Measure memory bandwidth each round; report each engine's fraction of it.")
    ap.add_argument("--grounded", action="store_true",
                    help="Also: edge-infer plain and --speculative auto vs llama.cpp plain on the grounded set.")
    ap.add_argument("--task-set", choices=["grounded", "code"], default="grounded",
                    help="Which tasks --grounded runs: the grounded set, or the code set (four standard-library "
                         "functions, an instruction to add type hints: issue 19's code-editing check).")
    ap.add_argument("--grounded-tasks", default=None,
                    help="Comma-separated names of grounded tasks to run (default: all of them).")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS.md", help="Markdown that --write writes.")
    ap.add_argument("--json-out", type=Path, default=REPO / "benchmarks" / "results.json",
                    help="Raw JSON that --write writes.")
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
    prompt_ids, text, grounded, kv_mib = prompts(args.model, lengths, args.new_tokens, args.grounded, args.task_set)
    if grounded and args.grounded_tasks:
        keep = args.grounded_tasks.split(",")
        if set(keep) - set(grounded):
            sys.exit(f"unknown grounded tasks {sorted(set(keep) - set(grounded))}; known: {', '.join(grounded)}")
        grounded = {k: v for k, v in grounded.items() if k in keep}
    manifest = json.loads((Path(args.model) / "manifest.json").read_text())
    q = manifest["quantization"]
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": git_commit(),
            "load_before": load_avg(), "text": text, "genai_options": peers.get("genai_options", "?"),
            "edge_model": f"edge-infer `export` of the GGUF, {q.get('scheme')} block {q.get('block_size')} "
                          f"{'sym' if q.get('symmetric') else 'asym'}, embeddings {q.get('embeddings')}, "
                          f"lm_head {q.get('lm_head')}, accuracy_level {q.get('accuracy_level')}"
                          + (f" ({q['gguf_q4_1']})" if q.get("gguf_q4_1") else ""),
            "command": " ".join([".venv/bin/python", "benchmarks/sidebyside.py", *sys.argv[1:]]),
            "model_name": args.model_name, "genai_source": args.genai_source, "kv_mib": kv_mib,
            "llama_source": f"{Path(args.gguf).name}, read directly" if args.gguf else "the original Q4_1 GGUF",
            "weight_bytes": weight_bytes(args, peers) if args.bandwidth else None,
            "compare": describe_export(args.compare) if args.compare else None}
    started = time.perf_counter()
    got = measure_all(args, peers, prompt_ids)
    meta.update(load_after=load_avg(), versions={e: got["info"][e]["version"] for e in ENGINES},
                machine=got["info"]["edge"]["machine"], seconds=round(time.perf_counter() - started),
                bandwidth=got["info"]["bandwidth"])
    if grounded:
        meta["grounded"] = measure_grounded(args, peers, grounded)
        meta["load_after_grounded"] = load_avg()
    if args.export_rounds:
        meta["export_times"] = export_times(args, peers)
    done = min(len(v) for v in got["rows"].values())
    got["rows"] = {k: v[:done] for k, v in got["rows"].items()}
    meta["rounds_done"] = done
    med = summarize(got["rows"], lengths)
    text_md = markdown(args, meta, med, got["rows"], lengths)
    print(text_md)
    if args.write:
        args.out.write_text(text_md)
        raw = {"meta": meta, "medians": {f"{e}@{n}": v for (e, n), v in med.items()},
               "runs": {f"{e}@{n}": v for (e, n), v in got["rows"].items()}}
        args.json_out.write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
