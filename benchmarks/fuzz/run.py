"""Fuzz the GGUF and safetensors readers for a fixed time and report executions and findings.

    .venv/bin/python benchmarks/fuzz/run.py --seconds 300 [--out benchmarks/fuzz/last_run.json]

Seeds: a valid tiny llama GGUF and a valid safetensors file, plus every case of the malformed-input
corpus (tests/hostile_corpus.py) and the earlier findings (tests/corpus/found/). Each target runs
half the time in its own libFuzzer process under -rss_limit_mb=2048 and -timeout=10. Findings land in
benchmarks/fuzz/findings/; once fixed, copy them to tests/corpus/found/ so the corpus test keeps them.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))


def seeds(work: Path) -> dict[str, Path]:
    from hostile_corpus import gguf_cases, safetensors_cases, safetensors_seed
    from test_gguf_file import tiny_llama

    tiny_llama(work)
    gguf_seed = (work / "llama.gguf").read_bytes()
    dirs = {}
    for kind, seed, cases in (("gguf", gguf_seed, gguf_cases(gguf_seed)),
                              ("safetensors", safetensors_seed(), safetensors_cases(safetensors_seed()))):
        d = work / f"seeds-{kind}"
        d.mkdir()
        (d / "valid").write_bytes(seed)
        for i, data in enumerate(cases.values()):
            (d / f"case{i:04d}").write_bytes(data)
        for p in (ROOT / "tests" / "corpus" / "found").glob(f"{kind}-*"):
            shutil.copy(p, d / p.name)
        dirs[kind] = d
    return dirs


def fuzz(kind: str, seed_dir: Path, work: Path, seconds: int) -> dict:
    corpus = work / f"corpus-{kind}"
    corpus.mkdir()
    findings = ROOT / "benchmarks" / "fuzz" / "findings"
    findings.mkdir(exist_ok=True)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "fuzz" / "target.py"), kind, str(findings),
           f"-max_total_time={seconds}", "-rss_limit_mb=2048", "-timeout=10", "-max_len=65536",
           f"-artifact_prefix={findings}/{kind}-crash-", "-print_final_stats=1", str(corpus), str(seed_dir)]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 300)
    log = proc.stdout + proc.stderr
    (work / f"{kind}.log").write_text(log)
    (ROOT / "benchmarks" / "fuzz" / f"last_{kind}.log").write_text(log[-20000:])
    runs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", log)
    cov = re.findall(r"cov: (\d+) ft: (\d+)", log)
    found = re.findall(r"^FINDING (.*)$", log, flags=re.M)
    artifacts = re.findall(r"Test unit written to (\S+)", log)
    return {"target": kind, "seconds": round(time.monotonic() - start), "executions": int(runs[-1]) if runs else 0,
            "coverage_edges": int(cov[-1][0]) if cov else 0, "features": int(cov[-1][1]) if cov else 0,
            "seed_inputs": len(list(seed_dir.iterdir())), "corpus_after": len(list(corpus.iterdir())),
            "findings": found, "crash_artifacts": artifacts, "exit": proc.returncode}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=300, help="total fuzzing time, split between the targets")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "fuzz" / "last_run.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="edge-infer-fuzz-") as tmp:
        work = Path(tmp)
        dirs = seeds(work)
        results = [fuzz(kind, dirs[kind], work, args.seconds // 2) for kind in ("gguf", "safetensors")]
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'target':<13}{'seconds':>8}{'executions':>12}{'exec/s':>8}{'edges':>7}{'seeds':>7}{'corpus':>8}"
          f"{'findings':>10}")
    for r in results:
        rate = r["executions"] / max(r["seconds"], 1)
        print(f"{r['target']:<13}{r['seconds']:>8}{r['executions']:>12}{rate:>8.0f}{r['coverage_edges']:>7}"
              f"{r['seed_inputs']:>7}{r['corpus_after']:>8}{len(r['findings']) + len(r['crash_artifacts']):>10}")
        for f in r["findings"] + r["crash_artifacts"]:
            print(f"  {r['target']}: {f}")


if __name__ == "__main__":
    main()
