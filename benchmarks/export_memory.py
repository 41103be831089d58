"""Peak RSS, CPU and wall time of exports, each in its own process, measured side by side.

    python benchmarks/export_memory.py --gguf M.gguf --hf HF_FOLDER --out results.json \
        [--edge-infer .venv/bin/edge-infer] [--label after] [--edge-args "--rounding rtn"] \
        [--validate both|yes|no] [--genai-python PY]

For each source it runs `edge-infer export SRC -o TMP --quant int4` with and without
validation, and (with --genai-python) onnxruntime-genai's model builder on the HF folder
(`-p int4 -e cpu`, block 32, accuracy level 4, as benchmarks/peers.py builds it). Peak RSS is
the child's own `ru_maxrss` from `os.wait4` (resident memory, file-backed pages included),
read once the process ends; no sampling. CPU seconds (user + sys, all threads) come from the
same rusage: on a shared, loaded machine they compare tools more fairly than wall time. A
second RSS column samples the process's anonymous memory (RssAnon) every 50 ms to separate
heap from mapped files. The stage timings of each edge-infer run come from its progress
output, each with the peak anonymous RSS sampled while it ran (`stage_peak_anon_mib`). With
--sha256 the sha256 of the export's model.onnx.data is recorded (to check that a change keeps the
exported bits). Results append to --out (JSON), and a Markdown table is printed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path


def cpu_name() -> str:
    from edge_infer.bench.measure import cpu_model

    return cpu_model()


def _anon_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def measure(cmd: list[str], log: Path) -> dict:
    """Run cmd; its peak RSS (MiB, ru_maxrss), peak anonymous RSS (sampled), wall seconds and the
    anonymous RSS samples ((seconds since start, KiB), in `samples`)."""
    start = time.perf_counter()
    samples: list[tuple[float, int]] = []
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        peak_anon = [0]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.05):
                kib = _anon_kib(proc.pid)
                samples.append((time.perf_counter() - start, kib))
                peak_anon[0] = max(peak_anon[0], kib)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        t.join()
    seconds = time.perf_counter() - start
    return {"rc": os.waitstatus_to_exitcode(status), "seconds": round(seconds, 1),
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024), "peak_anon_mib": round(peak_anon[0] / 1024),
            "samples": samples}


def stage_peaks(stage_list: list[tuple[float, str]], samples: list[tuple[float, int]]) -> list[tuple[float, str, int]]:
    """(start, stage, peak anonymous RSS in MiB while it ran) per stage, from the samples."""
    out = []
    for k, (t0, name) in enumerate(stage_list):
        t1 = stage_list[k + 1][0] if k + 1 < len(stage_list) else float("inf")
        peak = max((kib for t, kib in samples if t0 <= t < t1), default=0)
        out.append((t0, name, round(peak / 1024)))
    return out


def stages(log: Path) -> list[tuple[float, str]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        m = re.match(r"\[\s*([\d.]+)s\] (.*)", line)
        if m:
            out.append((float(m.group(1)), m.group(2)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--hf", type=Path)
    ap.add_argument("--edge-infer", default=str(Path(__file__).resolve().parent.parent / ".venv/bin/edge-infer"))
    ap.add_argument("--label", default="")
    ap.add_argument("--genai-python", default=None)
    ap.add_argument("--edge-args", default="", help="extra edge-infer export options, e.g. '--rounding rtn'")
    ap.add_argument("--validate", choices=("both", "yes", "no"), default="both")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=None, help="where outputs go (removed after each run)")
    ap.add_argument("--sha256", action="store_true", help="record the sha256 of each export's model.onnx.data")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="export-memory-", dir=args.work))
    rows = []
    runs = []
    for kind, src in ((f"GGUF {args.gguf.name if args.gguf else ''}", args.gguf), ("HF fp16 folder", args.hf)):
        if src is None:
            continue
        for validate in {"both": (False, True), "yes": (True,), "no": (False,)}[args.validate]:
            runs.append((f"edge-infer {args.label} {args.edge_args}".strip(), kind, validate,
                         [args.edge_infer, "export", str(src), "-o", str(work / "out"), "--quant", "int4", "--force"]
                         + ([] if validate else ["--no-validate"]) + args.edge_args.split()))
    if args.genai_python and args.hf is not None:
        runs.append(("onnxruntime-genai builder", "HF fp16 folder", False,
                     [args.genai_python, "-m", "onnxruntime_genai.models.builder", "-i", str(args.hf),
                      "-o", str(work / "out"), "-p", "int4", "-e", "cpu", "-c", str(work / "cache"),
                      "--extra_options", "block_size=32", "accuracy_level=4", "hf_token=false"]))
    for tool, kind, validate, cmd in runs:
        log = work / "log.txt"
        print("+", " ".join(cmd), flush=True)
        r = measure(cmd, log)
        r.update(tool=tool, source=kind, validate=validate, stages=stages(log), cpu=cpu_name(),
                 log_tail=log.read_text(errors="replace").splitlines()[-6:])
        r["stage_peak_anon_mib"] = stage_peaks(r["stages"], r.pop("samples"))
        if r["rc"]:
            print("\n".join(r["log_tail"]))
        if args.sha256 and (work / "out" / "model.onnx.data").exists():
            digest = hashlib.sha256()
            with open(work / "out" / "model.onnx.data", "rb") as data:
                for chunk in iter(lambda: data.read(1 << 24), b""):
                    digest.update(chunk)
            r["data_sha256"] = digest.hexdigest()
        shutil.rmtree(work / "out", ignore_errors=True)
        shutil.rmtree(work / "cache", ignore_errors=True)
        rows.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "log_tail"}), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    if args.out:
        old = json.loads(args.out.read_text()) if args.out.exists() else []
        args.out.write_text(json.dumps(old + rows, indent=1))
    print(f"\nCPU: {cpu_name()}\n")
    print("| tool | source | validation | peak RSS (MiB) | peak anon RSS (MiB) | wall (s) | CPU user+sys (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tool']} | {r['source']} | {'yes' if r['validate'] else 'no'} | {r['peak_rss_mib']} | "
              f"{r['peak_anon_mib']} | {r['seconds']}{'' if r['rc'] == 0 else ' (failed)'} | {r['cpu_seconds']} |")


if __name__ == "__main__":
    main()
