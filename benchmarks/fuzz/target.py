"""One coverage-guided fuzz target (atheris / libFuzzer) for our GGUF or safetensors reader.

    python benchmarks/fuzz/target.py gguf|safetensors FINDINGS_DIR [libFuzzer args and corpus dirs]

Each input is written to a file in /dev/shm (the readers take a path and mmap it) and read the way
`export` reads it. Our own `ModelFileError` is the expected answer to garbage; anything else (another
exception, a crash, a hang past -timeout, memory past -rss_limit_mb) is a finding. Unexpected
exceptions are saved to FINDINGS_DIR and the run goes on, so one run counts them all.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

import atheris

import gguf  # noqa: E402,F401  - libraries first, uninstrumented: coverage guides on our code only
import numpy  # noqa: E402,F401

import edge_infer  # noqa: E402,F401
from edge_infer.contract.errors import UserError  # noqa: E402

with atheris.instrument_imports(include=["edge_infer.export"]):
    from edge_infer.export import checkpoint, gguf_file, gguf_limits  # noqa: F401

KIND = sys.argv[1]
FINDINGS = Path(sys.argv[2])
SCRATCH = Path(tempfile.mkstemp(prefix=f"fuzz-{KIND}-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)[1])
seen: set[str] = set()


def parse(path: Path) -> None:
    if KIND == "gguf":
        g = gguf_file.read_gguf(path)
        if g.metadata.get("general.architecture") in gguf_file.SUPPORTED_ARCHS:
            _, weights, _ = gguf_file.gguf_to_hf(g)
            for t in list(weights.values())[:3]:
                t.dequantize()
                t.blocks()
        else:
            for t in list(g.tensors.values())[:3]:
                t.dequantize()
    else:
        f = checkpoint.SafetensorsFile(path)
        for name in f.entries:
            f.get(name)


def one_input(data: bytes) -> None:
    SCRATCH.write_bytes(data)
    try:
        parse(SCRATCH)
    except UserError:
        pass
    except Exception as e:  # a finding: save it, count it once per (type, place), keep fuzzing
        tb = e.__traceback__
        while tb.tb_next is not None:
            tb = tb.tb_next
        key = f"{type(e).__name__} at {Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}"
        if key not in seen:
            seen.add(key)
            FINDINGS.mkdir(parents=True, exist_ok=True)
            name = f"{KIND}-{hashlib.sha1(data).hexdigest()[:12]}"
            (FINDINGS / name).write_bytes(data)
            print(f"FINDING {name}: {key}: {str(e)[:200]}", flush=True)


if __name__ == "__main__":
    atheris.Setup([sys.argv[0]] + sys.argv[3:], one_input)
    try:
        atheris.Fuzz()
    finally:
        SCRATCH.unlink(missing_ok=True)
