"""Load benchmark for `edge-infer serve`: starts the server on loopback, measures, stops it.

    .venv/bin/python benchmarks/serve_load.py MODEL [--parallel 8] [--max-length 2048] \
        [--scenarios throughput,ttft,prefix,mixed] [--mixed-seconds 180] [--json out.json]

Scenarios (the targets of the serve issue):
  throughput  8 story prompts alone, one after another, then all 8 at once (greedy): aggregate
              decode tokens/s vs a single stream, and whether every response equals its solo run
  ttft        time to first token of a short request on an idle server, then while 7 others stream
  prefix      a ~1,000-token conversation: first-turn TTFT vs second-turn TTFT (prefix cache)
  mixed       16 clients for --mixed-seconds: varied prompt lengths, 10% cancelled mid-stream,
              5% over the context; error counts and server RSS over time
  soak        16 clients for --soak-seconds (issue 10): streaming and not, cancellations, bad
              requests interleaved (invalid JSON, lone surrogates, another model's name, bad
              parameters, over-context, over-size bodies: each must get its intended 4xx), long and
              short prompts; every greedy answer compared with its solo run on the idle server;
              server RSS, threads, /health and its stderr (tracebacks) watched throughout

Bounded: every request has max_tokens, every scenario a fixed count or duration, and the
server only ever listens on 127.0.0.1. Token times are SSE chunk arrival times (one chunk
per token whose text is final; a held-back multi-byte character shows up in the next chunk).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx
import psutil

from edge_infer.bench.measure import cpu_model

STORIES = [
    "Write a long story about a dragon who learns to cook.", "Write a long story about a lighthouse keeper and a storm.",
    "Explain in detail how a steam engine works.", "Write a long letter from a sailor to his family.",
    "Describe, step by step, how to plan a vegetable garden.", "Write a long story about a robot that paints.",
    "Explain the history of the printing press in detail.", "Write a long story about two friends crossing a desert.",
]
WORDS = ("river mountain quiet lantern market window garden winter copper thunder harbor meadow violin "
         "orchard candle canyon pepper meteor saddle compass glacier velvet marble falcon ribbon").split()


@dataclass
class Result:
    status: int = 0
    text: str = ""
    finish: str | None = None
    usage: dict | None = None
    start: float = 0.0
    times: list[float] = field(default_factory=list)  # arrival of each chunk with text
    error: str = ""
    cancelled: bool = False

    @property
    def ttft(self) -> float:
        return self.times[0] - self.start if self.times else float("nan")

    @property
    def decode_rate(self) -> float:
        if len(self.times) < 2:
            return float("nan")
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])


def words(n: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


async def chat(client: httpx.AsyncClient, messages: list[dict], max_tokens: int, *, stream: bool = True,
               cancel_after: int | None = None, **extra) -> Result:
    """One chat request; with cancel_after, the stream is closed after that many text chunks."""
    body = {"model": "m", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": stream,
            **extra}
    if stream:
        body["stream_options"] = {"include_usage": True}
    r = Result(start=time.perf_counter())
    try:
        if not stream:
            resp = await client.post("/v1/chat/completions", json=body)
            r.status = resp.status_code
            data = resp.json()
            if resp.status_code == 200:
                r.text, r.finish = data["choices"][0]["message"]["content"], data["choices"][0]["finish_reason"]
                r.usage = data["usage"]
                r.times.append(time.perf_counter())
            else:
                r.error = data.get("error", {}).get("code") or str(resp.status_code)
            return r
        async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            r.status = resp.status_code
            if resp.status_code != 200:
                r.error = json.loads(await resp.aread()).get("error", {}).get("code") or str(resp.status_code)
                return r
            parts = []
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    r.error = chunk["error"].get("code") or "stream error"
                    continue
                if chunk.get("usage"):
                    r.usage = chunk["usage"]
                for choice in chunk.get("choices", []):
                    text = choice["delta"].get("content")
                    if text:
                        r.times.append(time.perf_counter())
                        parts.append(text)
                    r.finish = choice.get("finish_reason") or r.finish
                if cancel_after is not None and len(r.times) >= cancel_after:
                    r.cancelled = True
                    break  # leaving the block closes the connection
            r.text = "".join(parts)
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        r.error = f"{type(e).__name__}: {e}"
    return r


# -- scenarios -----------------------------------------------------------------------


async def throughput(client: httpx.AsyncClient, max_tokens: int, rounds: int) -> dict:
    """Rounds of (each prompt alone, then all together), so both sides see the same machine load."""
    prompts = [[{"role": "user", "content": p}] for p in STORIES]
    runs = []
    for _ in range(rounds):
        solo = [await chat(client, m, max_tokens) for m in prompts]
        t0 = time.perf_counter()
        together = await asyncio.gather(*[chat(client, m, max_tokens) for m in prompts])
        wall = time.perf_counter() - t0
        # Steady state: the window in which every stream has started and none has ended.
        lo = max(r.times[0] for r in together)
        hi = min(r.times[-1] for r in together)
        in_window = sum(lo <= t <= hi for r in together for t in r.times)
        single = statistics.median(r.decode_rate for r in solo)
        aggregate = in_window / (hi - lo) if hi > lo else float("nan")
        runs.append({
            "single_stream_decode_tok_s": single, "aggregate_decode_tok_s": aggregate, "ratio": aggregate / single,
            "overall_tok_s": sum(r.usage["completion_tokens"] for r in together) / wall, "window_s": hi - lo,
            "completion_tokens": [r.usage["completion_tokens"] for r in together],
            "identical_to_solo": sum(a.text == b.text for a, b in zip(solo, together)),
            "errors": sum(bool(r.error) for r in solo + together),
        })
    med = {k: statistics.median(r[k] for r in runs) for k in
           ("single_stream_decode_tok_s", "aggregate_decode_tok_s", "ratio", "overall_tok_s")}
    return {**med, "streams": len(prompts), "identical_to_solo": min(r["identical_to_solo"] for r in runs),
            "errors": sum(r["errors"] for r in runs), "rounds": runs}


async def ttft(client: httpx.AsyncClient, others: int, prefill_chunk: int, repeats: int = 5) -> dict:
    def short(i: int) -> list[dict]:
        return [{"role": "user", "content": f"Question {i}: what is the capital of France?"}]

    idle = [(await chat(client, short(i), 8)).ttft for i in range(repeats)]
    chunk = [await chat(client, [{"role": "user", "content": words(180, random.Random(i))}], 1)
             for i in range(3)]
    background = [asyncio.create_task(chat(client, [{"role": "user", "content": STORIES[i % len(STORIES)]}],
                                           1000, cancel_after=10**6)) for i in range(others)]
    await asyncio.sleep(1.0)
    while True:  # wait until every background stream is decoding
        snap = (await client.get("/health")).json()
        if snap["busy"] >= others and snap["waiting"] == 0:
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)
    loaded = [(await chat(client, short(100 + i), 8)).ttft for i in range(repeats)]
    busy_during = (await client.get("/health")).json()["busy"]
    for task in background:
        task.cancel()
    await asyncio.gather(*background, return_exceptions=True)
    idle_med, loaded_med = statistics.median(idle), statistics.median(loaded)
    # One prefill chunk's time, from the idle prefill rate of a ~250-token prompt.
    chunk_s = statistics.median(r.ttft * prefill_chunk / (r.usage["prompt_tokens"] -
                                                          r.usage["prompt_tokens_details"]["cached_tokens"])
                                for r in chunk)
    return {"idle_ttft_s": idle_med, "loaded_ttft_s": loaded_med, "others_streaming": others,
            "busy_slots_seen": busy_during, "ratio": loaded_med / idle_med,
            "prefill_chunk_tokens": prefill_chunk, "prefill_of_a_chunk_s": chunk_s,
            "target_s": 1.5 * idle_med + chunk_s, "idle_all": idle, "loaded_all": loaded}


async def prefix(client: httpx.AsyncClient, repeats: int = 3) -> dict:
    rows = []
    for i in range(repeats):
        rng = random.Random(1000 + i)
        doc = f"Document {i}-{rng.random():.6f}. " + words(940, rng)
        messages = [{"role": "user", "content": f"Read this notebook page and tell me its first word.\n\n{doc}"}]
        first = await chat(client, messages, 32)
        messages += [{"role": "assistant", "content": first.text},
                     {"role": "user", "content": "Now give me its last word."}]
        second = await chat(client, messages, 32)
        rows.append({"first_ttft_s": first.ttft, "second_ttft_s": second.ttft,
                     "first_prompt_tokens": first.usage["prompt_tokens"],
                     "second_prompt_tokens": second.usage["prompt_tokens"],
                     "second_cached_tokens": second.usage["prompt_tokens_details"]["cached_tokens"]})
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    med["ratio"] = med["second_ttft_s"] / med["first_ttft_s"]
    return {**med, "runs": rows}


async def mixed(client: httpx.AsyncClient, server: psutil.Process, clients: int, seconds: float,
                max_length: int) -> dict:
    counts: dict[str, int] = {}
    rss: list[tuple[float, float]] = []
    ttfts: list[float] = []
    t0 = time.perf_counter()
    deadline = t0 + seconds

    def count(key: str) -> None:
        counts[key] = counts.get(key, 0) + 1

    async def worker(k: int) -> None:
        rng = random.Random(k)
        while time.perf_counter() < deadline:
            roll = rng.random()
            size = rng.choice((20, 20, 120, 300, 700))
            messages = [{"role": "user", "content": f"Client {k}: " + words(size, rng)}]
            if roll < 0.05:  # over the context: refused up front
                over = rng.random() < 0.5
                content = words(max_length * 2, rng) if over else messages[0]["content"]
                r = await chat(client, [{"role": "user", "content": content}], 64 if over else max_length)
                count("over_context_400" if r.status == 400 and r.error == "context_length_exceeded"
                      else f"over_context_unexpected_{r.status}_{r.error}")
                continue
            stream = rng.random() < 0.7
            cancel = rng.randint(1, 12) if roll < 0.15 else None
            extra = {"temperature": 0.8, "seed": rng.randint(0, 10**6)} if rng.random() < 0.5 else {}
            r = await chat(client, messages, rng.randint(16, 128), stream=stream or cancel is not None,
                           cancel_after=cancel, **extra)
            if r.cancelled:
                count("cancelled")
            elif r.status == 200 and not r.error:
                count("ok")
                ttfts.append(r.ttft)
            elif r.status == 429:
                count("busy_429")
            else:
                count(f"error_{r.status}_{r.error[:60]}")

    async def sample_rss() -> None:
        while time.perf_counter() < deadline:
            rss.append((time.perf_counter() - t0, server.memory_info().rss / 2**20))
            await asyncio.sleep(2.0)

    await asyncio.gather(sample_rss(), *[worker(k) for k in range(clients)])
    warm = min(60.0, seconds * 0.25)
    after = [m for t, m in rss if t >= warm]
    health = (await client.get("/health")).status_code
    return {
        "seconds": seconds, "clients": clients, "counts": counts,
        "server_errors": sum(v for k, v in counts.items() if k.startswith("error_5")),
        "errors": sum(v for k, v in counts.items() if k.startswith(("error_", "over_context_unexpected"))),
        "rss_start_mib": rss[0][1], "rss_after_warmup_mib": after[0], "rss_end_mib": after[-1],
        "rss_max_mib": max(m for _, m in rss), "rss_growth_after_warmup_mib": after[-1] - after[0],
        "warmup_s": warm, "ttft_p50_s": statistics.median(ttfts) if ttfts else None,
        "ttft_p95_s": sorted(ttfts)[int(0.95 * len(ttfts))] if ttfts else None,
        "health_after": health, "server_alive": server.is_running(),
    }


BAD_REQUESTS = [  # (name, raw body or None for a JSON body, JSON body, expected status, expected error code or None)
    ("invalid_json", b'{"messages": [', None, 400, "invalid_json"),
    ("lone_surrogate", b'{"model":"m","messages":[{"role":"user","content":"a\\ud800b"}],"max_tokens":4}', None,
     400, "invalid_unicode"),
    ("other_model", None, {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404,
     "model_not_found"),
    ("bad_temperature", None, {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 5},
     400, "invalid_value"),
    # Lenient by default (README "Lenient requests"): an unknown field is ignored and the request answered;
    # `serve --strict` would give 400 unknown_parameter.
    ("unknown_field_ignored", None, {"model": "m", "messages": [{"role": "user", "content": "hi"}], "frobnicate": 1,
                                     "max_tokens": 4}, 200, None),
    ("empty_messages", None, {"model": "m", "messages": []}, 400, "invalid_value"),
    ("too_large", None, {"model": "m", "messages": [{"role": "user", "content": "x" * (1 << 20)}]}, 413,
     "request_too_large"),
]


async def bad_request(client: httpx.AsyncClient, rng: random.Random, max_length: int) -> tuple[str, bool]:
    """One malformed request; (name, whether it got exactly its intended status and code)."""
    if rng.random() < 0.2:  # over the context: a valid request that cannot fit
        r = await chat(client, [{"role": "user", "content": words(max_length * 2, rng)}], 16, stream=False)
        return "over_context", r.status == 400 and r.error == "context_length_exceeded"
    name, raw, body, status, code = rng.choice(BAD_REQUESTS)
    try:
        if raw is not None:
            resp = await client.post("/v1/chat/completions", content=raw,
                                     headers={"Content-Type": "application/json"})
        else:
            resp = await client.post("/v1/chat/completions", json=body)
        got = resp.json().get("error", {}).get("code")
        return name, resp.status_code == status and got == code
    except (httpx.HTTPError, json.JSONDecodeError):
        return name, False


def greedy_prompts(n: int = 12) -> list[tuple[list[dict], int]]:
    """Short and long greedy prompts with their max_tokens, each answered solo before the soak."""
    out = []
    for i in range(n):
        rng = random.Random(5000 + i)
        size = (8, 40, 200, 500)[i % 4]
        text = STORIES[i % len(STORIES)] if size == 8 else f"Summarize this in one line: {words(size, rng)}"
        out.append(([{"role": "user", "content": text}], (16, 32, 48)[(i // 4) % 3]))
    return out


async def soak(client: httpx.AsyncClient, server: psutil.Process, clients: int, seconds: float,
               max_length: int, log: list[str], n_greedy: int) -> dict:
    counts: dict[str, int] = {}
    rss: list[tuple[float, float]] = []
    threads: list[int] = []
    health_fail = 0
    prompts = greedy_prompts(n_greedy)
    solo = []
    for messages, n in prompts:  # on the idle server, one at a time
        r = await chat(client, messages, n, stream=False)
        assert r.status == 200, r.error
        solo.append(r.text)
    mismatches: list[dict] = []
    t0 = time.perf_counter()
    deadline = t0 + seconds

    def count(key: str) -> None:
        counts[key] = counts.get(key, 0) + 1

    async def worker(k: int) -> None:
        rng = random.Random(100 + k)
        while time.perf_counter() < deadline:
            roll = rng.random()
            if roll < 0.12:
                name, ok = await bad_request(client, rng, max_length)
                count(f"bad_{name}_{'intended' if ok else 'UNEXPECTED'}")
                continue
            stream = rng.random() < 0.6
            if roll < 0.55:  # greedy, compared with its solo answer (unless cancelled)
                i = rng.randrange(len(prompts))
                messages, n = prompts[i]
                cancel = rng.randint(1, 8) if stream and rng.random() < 0.15 else None
                r = await chat(client, messages, n, stream=stream, cancel_after=cancel)
                kind = "greedy"
            else:  # sampled, a random length
                size = rng.choice((5, 20, 120, 300, 700, 1200))
                messages = [{"role": "user", "content": f"Client {k}: " + words(size, rng)}]
                cancel = rng.randint(1, 12) if stream and rng.random() < 0.15 else None
                r = await chat(client, messages, rng.randint(8, 96), stream=stream, cancel_after=cancel,
                               temperature=0.8, seed=rng.randint(0, 10**6))
                kind = "sampled"
            if r.cancelled:
                count("cancelled")
            elif r.status == 429:
                count("busy_429")
            elif r.status == 200 and not r.error:
                count(f"ok_{kind}")
                if kind == "greedy":
                    if r.text == solo[i]:
                        count("greedy_equal_to_solo")
                    else:
                        mismatches.append({"prompt": i, "solo": solo[i][:80], "got": r.text[:80]})
            else:
                count(f"error_{r.status}_{r.error[:60]}")

    async def watch() -> None:
        nonlocal health_fail
        while time.perf_counter() < deadline:
            rss.append((time.perf_counter() - t0, server.memory_info().rss / 2**20))
            threads.append(server.num_threads())
            try:
                if (await client.get("/health")).status_code != 200:
                    health_fail += 1
            except httpx.HTTPError:
                health_fail += 1
            await asyncio.sleep(2.0)

    await asyncio.gather(watch(), *[worker(k) for k in range(clients)])
    warm = min(60.0, seconds * 0.25)
    after = [m for t, m in rss if t >= warm]
    health = (await client.get("/health")).json()
    tracebacks = [line for line in log if "Traceback" in line or "Exception in" in line]
    return {
        "seconds": seconds, "clients": clients, "counts": dict(sorted(counts.items())),
        "requests": sum(v for k, v in counts.items() if k != "greedy_equal_to_solo"),
        "unintended_errors": sum(v for k, v in counts.items() if k.startswith("error_") or "UNEXPECTED" in k),
        "greedy_compared": counts.get("greedy_equal_to_solo", 0) + len(mismatches),
        "greedy_mismatches": len(mismatches), "mismatch_examples": mismatches[:5],
        "rss_start_mib": rss[0][1], "rss_after_warmup_mib": after[0], "rss_end_mib": after[-1],
        "rss_max_mib": max(m for _, m in rss), "rss_growth_after_warmup_mib": after[-1] - after[0],
        "warmup_s": warm, "threads_min_max": [min(threads), max(threads)], "health_failures": health_fail,
        "health_after": health.get("status"), "server_tracebacks": len(tracebacks),
        "traceback_lines": tracebacks[:5], "server_alive": server.is_running(),
    }


# -- driver --------------------------------------------------------------------------


def start_server(model: str, parallel: int, max_length: int, prefill_chunk: int, threads: int | None,
                 extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "edge_infer.cli", "serve", model, "--host", "127.0.0.1", "--port", "0",
           "--parallel", str(parallel), "--max-length", str(max_length), "--prefill-chunk", str(prefill_chunk),
           "--log-level", "warning", "--model-name", "m", *extra]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        print(line.rstrip(), file=sys.stderr)
        m = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
        if m:
            threading.Thread(target=_drain, args=(proc,), daemon=True).start()
            return proc, m.group(1)
    raise SystemExit(f"the server did not start (exit {proc.wait()})")


SERVER_LOG: list[str] = []  # the server's stderr after startup (kept drained so it never blocks)


def _drain(proc: subprocess.Popen) -> None:
    for line in proc.stderr:
        SERVER_LOG.append(line.rstrip())


async def run(args, url: str, proc: subprocess.Popen) -> dict:
    out: dict = {}
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        while True:
            try:
                if (await client.get("/health")).status_code == 200:
                    break
            except httpx.HTTPError:
                await asyncio.sleep(0.2)
        if "throughput" in args.scenarios:
            out["throughput"] = await throughput(client, args.max_tokens, args.rounds)
            print(json.dumps({"throughput": out["throughput"]}), file=sys.stderr)
        if "ttft" in args.scenarios:
            out["ttft"] = await ttft(client, args.parallel - 1, args.prefill_chunk)
            print(json.dumps({"ttft": out["ttft"]}), file=sys.stderr)
        if "prefix" in args.scenarios:
            out["prefix"] = await prefix(client)
            print(json.dumps({"prefix": out["prefix"]}), file=sys.stderr)
        if "mixed" in args.scenarios:
            out["mixed"] = await mixed(client, psutil.Process(proc.pid), 16, args.mixed_seconds, args.max_length)
            print(json.dumps({"mixed": out["mixed"]}), file=sys.stderr)
        if "soak" in args.scenarios:
            out["soak"] = await soak(client, psutil.Process(proc.pid), 16, args.soak_seconds, args.max_length,
                                     SERVER_LOG, args.greedy_prompts)
            print(json.dumps({"soak": out["soak"]}), file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--prefill-chunk", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=128, help="per stream in the throughput scenario")
    ap.add_argument("--rounds", type=int, default=3, help="throughput rounds (solo runs, then together)")
    ap.add_argument("--mixed-seconds", type=float, default=180.0)
    ap.add_argument("--soak-seconds", type=float, default=600.0)
    ap.add_argument("--greedy-prompts", type=int, default=12, help="soak: greedy prompts answered solo first")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--scenarios", default="throughput,ttft,prefix,mixed")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    if not 1 <= args.soak_seconds <= 3600:
        raise SystemExit("--soak-seconds must be 1..3600")
    if not 1 <= args.mixed_seconds <= 1800 or not 1 <= args.max_tokens <= 1024 or not 1 <= args.rounds <= 10:
        raise SystemExit("--mixed-seconds must be 1..1800, --max-tokens 1..1024 and --rounds 1..10")
    proc, url = start_server(args.model, args.parallel, args.max_length, args.prefill_chunk, args.threads)
    try:
        results = asyncio.run(run(args, url, proc))
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    results["machine"] = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                          "load_avg_end": os.getloadavg()}
    results["server_exit_code"] = code
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
