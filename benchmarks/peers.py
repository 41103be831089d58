"""Set up the peers that `benchmarks/sidebyside.py` and `benchmarks/quality.py` compare against.

    python3 benchmarks/peers.py setup [--dir /work/peers]

Each peer gets its own virtual environment under --dir (never this repo's .venv):

  genai-venv     onnxruntime-genai 0.18 and what its model builder needs (torch, transformers 5).
  llamacpp-venv  llama-cpp-python 0.3.36, built from source for this CPU (GGML_NATIVE=ON; minutes).

and the models are built from the same weights as edge-infer's default model:

  hf-fp32/       the Q4_1 GGUF dequantized to fp32 and saved as a Hugging Face folder by
                 transformers 4.57 from this repo's .venv (the builder cannot read a quantized GGUF,
                 and transformers 5 refuses to save a GGUF-loaded model).
  genai-int4/    `python -m onnxruntime_genai.models.builder -p int4 -e cpu` with block_size=32 and
                 accuracy_level=4 (its defaults otherwise: symmetric, shared quantized embeddings).
  peers.json     versions, paths and how long the builder took (the export-time comparison).

llama.cpp reads the original Q4_1 GGUF directly. Every step is skipped when its output exists;
--force redoes the models. Standard library only, so any python3 can run it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAIN_PY = REPO / ".venv" / "bin" / "python"
GENAI = ["onnxruntime-genai==0.18.0", "torch==2.13.0", "transformers==5.24.0", "onnx", "onnx_ir",
         "safetensors", "tqdm", "numpy", "psutil"]
LLAMACPP = ["llama-cpp-python==0.3.36", "numpy", "psutil"]

DUMP_HF = """
import sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
gguf, out = Path(sys.argv[1]), sys.argv[2]
kw = dict(gguf_file=gguf.name)
model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
model.save_pretrained(out, safe_serialization=True)
AutoTokenizer.from_pretrained(str(gguf.parent), **kw).save_pretrained(out)
"""


def sh(cmd: list[str], env: dict | None = None, log: Path | None = None) -> float:
    """Run cmd (its output to log when given); returns the seconds it took."""
    print("+", " ".join(cmd), flush=True)
    start = time.perf_counter()
    if log is None:
        subprocess.run(cmd, check=True, env=env)
    else:
        with open(log, "w") as f:
            r = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        if r.returncode:
            sys.exit(f"failed (exit {r.returncode}); see {log}")
    return time.perf_counter() - start


def venv(path: Path, packages: list[str], env: dict | None = None, log: Path | None = None) -> Path:
    py = path / "bin" / "python"
    if not py.exists():
        sh([sys.executable, "-m", "venv", str(path)])
    marker = path / ".peer-installed"
    if not marker.exists() or marker.read_text() != " ".join(packages):
        sh([str(py), "-m", "pip", "install", "-q", *packages], env=env, log=log)
        marker.write_text(" ".join(packages))
    return py


def default_gguf() -> Path:
    out = subprocess.run([str(MAIN_PY), "-c", "from edge_infer.export.sources import default_model_path as p; "
                          "print(p())"], check=True, capture_output=True, text=True).stdout.strip()
    return Path(out)


def version(py: Path, module: str) -> str:
    return subprocess.run([str(py), "-c", f"import {module} as m; print(m.__version__)"], capture_output=True,
                          text=True).stdout.strip()


def setup(root: Path, force: bool) -> None:
    root.mkdir(parents=True, exist_ok=True)
    if not MAIN_PY.exists():
        sys.exit(f"{MAIN_PY} is missing: run `make venv` in {REPO} first")
    gguf = default_gguf()
    genai_py = venv(root / "genai-venv", GENAI, log=root / "genai-install.log")
    # A native build: the wheel is compiled here, for this CPU's instruction set.
    env = dict(os.environ, CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_BLAS=OFF", FORCE_CMAKE="1")
    llama_py = venv(root / "llamacpp-venv", LLAMACPP, env=env, log=root / "llamacpp-build.log")

    hf = root / "hf-fp32"
    if force or not (hf / "config.json").exists():
        shutil.rmtree(hf, ignore_errors=True)
        sh([str(MAIN_PY), "-c", DUMP_HF, str(gguf), str(hf)])
    info_path = root / "peers.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    genai = root / "genai-int4"
    if force or not (genai / "genai_config.json").exists():
        shutil.rmtree(genai, ignore_errors=True)
        seconds = sh([str(genai_py), "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(genai),
                      "-p", "int4", "-e", "cpu", "-c", str(root / "genai-cache"),
                      "--extra_options", "block_size=32", "accuracy_level=4", "hf_token=false"],
                     log=root / "genai-build.log")
        info["genai_builder_seconds"] = round(seconds, 1)
    info.update({
        "gguf": str(gguf), "hf_fp32": str(hf), "genai_model": str(genai),
        "genai_python": str(genai_py), "llamacpp_python": str(llama_py),
        "onnxruntime_genai": version(genai_py, "onnxruntime_genai"),
        "genai_onnxruntime": version(genai_py, "onnxruntime"),
        "llama_cpp_python": version(llama_py, "llama_cpp"),
        "genai_options": "int4, block_size=32, accuracy_level=4, is_symmetric=true (default), "
                         "shared_embeddings=true (default for tied embeddings)",
    })
    info_path.write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["setup"])
    ap.add_argument("--dir", type=Path, default=Path(os.environ.get("PEERS_DIR", "/work/peers")))
    ap.add_argument("--force", action="store_true", help="Rebuild the peer models.")
    args = ap.parse_args()
    setup(args.dir.resolve(), args.force)


if __name__ == "__main__":
    main()
