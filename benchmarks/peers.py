"""Set up the peers that `benchmarks/sidebyside.py` and `benchmarks/quality.py` compare against.

    python3 benchmarks/peers.py setup [--dir /work/peers]

Each peer gets its own virtual environment under --dir (never this repo's .venv):

  genai-venv     onnxruntime-genai 0.18 and what its model builder needs (torch, transformers 5).
  llamacpp-venv  llama-cpp-python 0.3.36, built from source for this CPU (minutes): the instruction
                 sets /proc/cpuinfo lists, except AMX (see ggml_cpu_args); elsewhere GGML_NATIVE=ON.

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


def venv(path: Path, packages: list[str], env: dict | None = None, log: Path | None = None,
         build: str = "") -> Path:
    """A venv with `packages`; `build` (compile options) is part of what it is: when it changes the
    packages are compiled again (--no-cache-dir: pip's wheel cache would hand back the old build)."""
    py = path / "bin" / "python"
    if not py.exists():
        sh([sys.executable, "-m", "venv", str(path)])
    marker = path / ".peer-installed"
    want = " ".join(packages) + (f"\n{build}" if build else "")
    if not marker.exists() or marker.read_text() != want:
        extra = (["--no-cache-dir"] + (["--force-reinstall"] if marker.exists() else [])) if build else []
        sh([str(py), "-m", "pip", "install", "-q", *extra, *packages], env=env, log=log)
        marker.write_text(want)
    return py


# /proc/cpuinfo flag -> ggml's CMake option for it (ggml/src/ggml-cpu/CMakeLists.txt, GGML_NATIVE=OFF branch).
GGML_ISA = {"avx": "GGML_AVX", "avx2": "GGML_AVX2", "fma": "GGML_FMA", "f16c": "GGML_F16C", "bmi2": "GGML_BMI2",
            "avx_vnni": "GGML_AVX_VNNI", "avx512vbmi": "GGML_AVX512_VBMI", "avx512_vnni": "GGML_AVX512_VNNI",
            "avx512_bf16": "GGML_AVX512_BF16"}


def ggml_cpu_args() -> str:
    """CMake options for llama.cpp's CPU backend: this CPU's instruction sets, AMX excluded.

    GGML_NATIVE=ON compiles with -march=native, which on a CPU that lists AMX (Sapphire Rapids and
    later) makes ggml repack Q4_0/Q4_1/Q8_0 weights for AMX tiles; under a hypervisor that lists AMX
    without handing out its tile state, the first `tilezero` dies with SIGILL (seen 2026-12-01 on
    the project's Xeon VMs: llama.cpp crashed on load of a Q4_0 GGUF). So: the same instruction sets
    -march=native would use, AMX off. Without /proc/cpuinfo (not Linux): GGML_NATIVE=ON.
    """
    try:
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return "-DGGML_NATIVE=ON"
    opts = ["-DGGML_NATIVE=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
    opts += [f"-D{opt}={'ON' if flag in flags else 'OFF'}" for flag, opt in GGML_ISA.items()]
    avx512 = {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"} <= flags
    opts.append(f"-DGGML_AVX512={'ON' if avx512 else 'OFF'}")
    return " ".join(opts)


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
    # Compiled here, for this CPU's instruction sets (AMX excluded: ggml_cpu_args); no llava/mtmd library.
    cmake = f"{ggml_cpu_args()} -DGGML_BLAS=OFF -DLLAVA_BUILD=OFF"
    env = dict(os.environ, CMAKE_ARGS=cmake, FORCE_CMAKE="1")
    llama_py = venv(root / "llamacpp-venv", LLAMACPP, env=env, log=root / "llamacpp-build.log", build=cmake)

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
        "llama_cpp_cmake_args": cmake,
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
