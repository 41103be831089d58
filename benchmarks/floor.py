"""Which onnxruntime is old enough? Runs our exports under older onnxruntime releases and compares.

    .venv/bin/python benchmarks/floor.py --versions 1.20.1,1.22.1,1.24.4 [--dir /tmp/floor]

Step 1 (this repo's .venv): export tiny random models that use every kernel feature our graphs
need (GroupQueryAttention with rotary inside and one shared KV buffer, sliding window and
soft-cap (gemma2), q/k norms (qwen3), 4-bit and 8-bit MatMulNBits, block offsets of the exact GGUF
import, quantized embeddings) and record greedy ids and first-step logits with the current
onnxruntime. Step 2: for each version, a venv with that onnxruntime (and this repo installed
without dependencies) loads the same folders and generates; a version passes when every model
loads, ids are identical and logits agree within 1e-3. Results go to benchmarks/FLOOR.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
CASES = [("llama", "fp32"), ("llama", "int4"), ("llama", "int8"), ("gemma2", "fp32"), ("qwen3", "int4"),
         ("phi3", "int4"), ("gpt2", "fp32")]
PROMPT = [5, 17, 33, 90, 4, 61, 7, 12]

PROBE = r"""
import json, sys
import numpy as np
import onnxruntime
import edge_infer
from edge_infer.runtime.generate import prefill
out = {"onnxruntime": onnxruntime.__version__, "models": {}}
for name, path in json.loads(sys.argv[1]).items():
    try:
        m = edge_infer.load(path, device="cpu", threads=1)
        cache = m.new_cache()
        logits = prefill(m, %s, cache)
        ids = [c.token for c in edge_infer.stream_generate(m, %s, max_tokens=16) if c.token is not None]
        out["models"][name] = {"ids": ids, "logits": np.asarray(logits, dtype=float).ravel()[:64].tolist()}
    except Exception as e:
        out["models"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
print(json.dumps(out))
""" % (PROMPT, PROMPT)


def export_cases(root: Path) -> dict[str, str]:
    from tiny import make_checkpoint

    from edge_infer.export.export_folder import ExportOptions, export_model

    paths = {}
    for kind, quant in CASES:
        out = root / f"{kind}-{quant}"
        if not (out / "manifest.json").exists():
            ckpt = root / f"ckpt-{kind}"
            if not (ckpt / "config.json").exists():
                make_checkpoint(kind, ckpt)
            export_model(ckpt, out, ExportOptions(quant=quant, max_length=64, validate=False, force=True))
        paths[f"{kind}-{quant}"] = str(out)
    return paths


def probe(python: Path, paths: dict[str, str]) -> dict:
    r = subprocess.run([str(python), "-c", PROBE, json.dumps(paths)], capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def venv_for(version: str, root: Path) -> Path:
    venv = root / f"venv-{version}"
    py = venv / "bin" / "python"
    if not (venv / ".ok").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", f"onnxruntime=={version}", "numpy==2.4.6", "onnx==1.23.2",
                        "tokenizers==0.22.2", "jinja2==3.1.6", "click==8.5.1"], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "-e", str(REPO)], check=True)
        (venv / ".ok").touch()
    return py


def compare(ref: dict, got: dict) -> str:
    if "error" in got:
        return "does not run: " + got["error"]
    bad = []
    for name, r in ref["models"].items():
        g = got["models"].get(name, {"error": "missing"})
        if "error" in g:
            bad.append(f"{name}: {g['error']}")
        elif g["ids"] != r["ids"]:
            bad.append(f"{name}: different ids")
        else:
            diff = max(abs(a - b) for a, b in zip(g["logits"], r["logits"], strict=True))
            if diff > 1e-3:
                bad.append(f"{name}: logits differ by {diff:.2g}")
    return "pass" if not bad else "; ".join(bad)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--versions", default="1.20.1,1.21.1,1.22.1,1.23.2,1.24.4")
    ap.add_argument("--dir", default="/tmp/edge-infer-floor")
    args = ap.parse_args()
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    paths = export_cases(root)
    ref = probe(Path(sys.executable), paths)
    rows = [(ref["onnxruntime"], "reference")]
    for v in args.versions.split(","):
        try:
            rows.append((v, compare(ref, probe(venv_for(v, root), paths))))
        except subprocess.CalledProcessError as e:
            rows.append((v, f"install failed: {e}"))
        print(rows[-1], flush=True)
    lines = ["| onnxruntime | result on " + ", ".join(paths) + " |", "|---|---|"]
    lines += [f"| {v} | {r} |" for v, r in rows]
    print("\n".join(lines))
    (root / "floor.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
