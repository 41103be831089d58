"""16 chat clients against `edge-infer serve --ray`: 1 vs 2 replicas, prefix-aware vs round-robin.

    .venv/bin/python benchmarks/cluster_bench.py MODEL_DIR [--clients 16] [--rounds 1] [--out benchmarks/CLUSTER.md]

Every client holds a two-turn conversation under one of four shared system prompts (~250 tokens
each): turn 2 repeats turn 1's messages, so a replica that served turn 1 has its prefix cached.
Reported per setup: aggregate completion tokens/s, p50/p95 time to first token, and the prefix-cache
hit rate (cached prompt tokens / prompt tokens, from `usage`). Each replica runs 1 thread; on a
2-core machine two replicas can use both cores. Setups run one after another in each round (the
machine is shared: compare within one run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

KEY = "bench-key-0123456789"
TOPICS = ["a travel agency in Lisbon", "a bicycle repair shop", "a public library help desk", "a cooking school"]
QUESTIONS = ["What are your opening hours?", "Can I book for next week?", "What does it cost?", "Where are you?",
             "Do you have parking?", "Can I bring a friend?", "Is there a student discount?", "How do I pay?"]


def system_prompt(topic: str) -> str:
    rules = " ".join(f"Rule {i}: answer politely, briefly and only about {topic}; never invent prices." for i in range(12))
    return f"You are the assistant of {topic}. {rules}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: str, replicas: int, routing: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "EDGE_INFER_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "edge_infer.cli", "serve", model, "--ray", "--replicas", str(replicas),
                             "--routing", routing, "--threads", "1", "--parallel", "8", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=5).json().get("replicas_up") == replicas:
                return proc, url
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(1)
    stop(proc)
    raise SystemExit(f"{replicas} replicas did not come up")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True)


def one_turn(url: str, messages: list, out: dict) -> str:
    # No "model": the server answers with the one it serves.
    body = {"messages": messages, "max_tokens": 48, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, text = None, ""
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        if r.status_code != 200:
            raise httpx.HTTPStatusError(f"HTTP {r.status_code}: {r.read()[:200]!r}", request=r.request, response=r)
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                text += chunk["choices"][0]["delta"]["content"]
            if chunk.get("usage"):
                u = chunk["usage"]
                out["completion"] += u["completion_tokens"]
                out["prompt"] += u["prompt_tokens"]
                out["cached"] += (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    out["ttft"].append(ttft if ttft is not None else time.perf_counter() - t0)
    return text


def run_clients(url: str, clients: int) -> dict:
    stats = {"completion": 0, "prompt": 0, "cached": 0, "ttft": [], "errors": 0}
    lock = threading.Lock()

    def client(i: int) -> None:
        local = {"completion": 0, "prompt": 0, "cached": 0, "ttft": []}
        messages = [{"role": "system", "content": system_prompt(TOPICS[i % len(TOPICS)])},
                    {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
        try:
            reply = one_turn(url, messages, local)
            messages += [{"role": "assistant", "content": reply},
                         {"role": "user", "content": QUESTIONS[(i + 3) % len(QUESTIONS)]}]
            one_turn(url, messages, local)
        except (httpx.HTTPError, ValueError):
            local["error"] = 1
        with lock:
            for k in ("completion", "prompt", "cached"):
                stats[k] += local[k]
            stats["ttft"] += local["ttft"]
            stats["errors"] += local.get("error", 0)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats["seconds"] = time.perf_counter() - t0
    return stats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    setups = [(1, "prefix"), (2, "prefix"), (2, "round-robin")]
    rows: dict = {s: [] for s in setups}
    for _ in range(args.rounds):
        for replicas, routing in setups:
            proc, url = start(args.model, replicas, routing)
            try:
                run_clients(url, 2)  # warm-up (not counted)
                rows[(replicas, routing)].append(run_clients(url, args.clients))
            finally:
                stop(proc)
            print(replicas, routing, rows[(replicas, routing)][-1]["seconds"], flush=True)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), platform.processor())
    lines = [f"CPU: {cpu}, {os.cpu_count()} logical cores; {args.clients} clients x 2 turns, 48 new tokens a turn, "
             f"{args.rounds} round(s), medians over rounds.", "",
             "| replicas | routing | aggregate tok/s | TTFT p50 s | TTFT p95 s | prefix-cache hit rate | errors |",
             "|---|---|---|---|---|---|---|"]
    for (replicas, routing), runs in rows.items():
        tps = statistics.median(r["completion"] / r["seconds"] for r in runs)
        ttfts = sorted(t for r in runs for t in r["ttft"])
        p50, p95 = ttfts[len(ttfts) // 2], ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))]
        hit = sum(r["cached"] for r in runs) / max(1, sum(r["prompt"] for r in runs))
        lines.append(f"| {replicas} | {routing} | {tps:.1f} | {p50:.2f} | {p95:.2f} | {hit:.1%} | "
                     f"{sum(r['errors'] for r in runs)} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text("# Ray Serve: 1 vs 2 replicas, prefix-aware vs round-robin routing\n\n"
                                  "`python benchmarks/cluster_bench.py MODEL_DIR --out benchmarks/CLUSTER.md`\n\n"
                                  + table + "\n")


if __name__ == "__main__":
    main()
