"""OpenVINO's CPU plugin on the npu profile beside edge-infer's default CPU path, in one run.

Each configuration runs `edge-infer bench --json` in its own process (onnxruntime-openvino
is a separate onnxruntime build, in .venv-npu); the configurations alternate, round after
round, so a noisy machine hits them alike. Medians over the rounds' medians.

    python benchmarks/npu_bench.py MODELS_DIR [--rounds 2] [--prompt 128] [--new 64]

MODELS_DIR holds default-int4, default-fp32, npu-int4, npu-fp32 exports of one source
(all with --max-length 1024).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = (  # (label, python environment, model folder, --device)
    ("default int4 (MatMulNBits, GQA), CPU provider 1.32", ".venv", "default-int4", "cpu"),
    ("npu int4 (DequantizeLinear), CPU provider 1.32", ".venv", "npu-int4", "cpu"),
    ("npu int4, OpenVINO CPU plugin (ORT-OV 1.24.1)", ".venv-npu", "npu-int4", "openvino:CPU"),
    ("default fp32, CPU provider 1.32", ".venv", "default-fp32", "cpu"),
    ("npu fp32, CPU provider 1.32", ".venv", "npu-fp32", "cpu"),
    ("npu fp32, OpenVINO CPU plugin (ORT-OV 1.24.1)", ".venv-npu", "npu-fp32", "openvino:CPU"),
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", type=Path)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    args = ap.parse_args()
    results: dict[str, list[dict]] = {c[0]: [] for c in CONFIGS}
    machine = None
    for r in range(args.rounds):
        for label, venv, folder, device in CONFIGS:
            cmd = [str(ROOT / venv / "bin" / "python"), "-c", "from edge_infer.cli import main; main()", "bench", str(args.models / folder), "--device", device,
                   "--prompt-tokens", str(args.prompt), "--new-tokens", str(args.new), "--runs", "2",
                   "--warmup", "1", "--json"]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                print(f"{label}: failed: {out.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                continue
            report = json.loads(out.stdout)
            machine = machine or report["machine"]
            results[label].append(report["results"][0]["median"])
            md = report["results"][0]["median"]
            print(f"round {r + 1} {label}: prefill {md['prefill_tok_s']:.1f} decode {md['decode_tok_s']:.1f}",
                  file=sys.stderr)
    print(f"machine: {json.dumps(machine)}")
    print(f"prompt {args.prompt} tokens, {args.new} new tokens, greedy; median of {args.rounds} rounds x 2 runs\n")
    print("| configuration | prefill tok/s | decode tok/s |")
    print("|---|---|---|")
    for label, runs in results.items():
        if runs:
            pre = statistics.median(x["prefill_tok_s"] for x in runs)
            dec = statistics.median(x["decode_tok_s"] for x in runs)
            print(f"| {label} | {pre:.0f} | {dec:.1f} |")


if __name__ == "__main__":
    main()
