"""Run our parsers on hostile inputs in a child process under a memory cap and a time limit.

`run_cases` starts one Python child per batch (imports are paid once), caps its
address space with RLIMIT_AS, and feeds it cases `(case_id, kind, path)`. The
child prints one JSON line per case: "ok" (parsed), "clean" (one of our
UserError family, with its message) or "crash" (anything else, with the type).
A case during which the child dies or runs out of time is reported as "killed"
or "timeout". Usable as a script too: `python tests/bounded.py < cases.json`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

MEMORY_CAP = 2 << 30  # bytes of address space for the child (imports take ~1 GiB of it)
SAMPLE = "Hello, world! aaaa héllo 你好 🙂 <|im_start|>user\n"


@dataclass(frozen=True)
class Outcome:
    status: str  # ok | clean | crash | killed | timeout
    error: str = ""  # exception type
    message: str = ""


def parse(kind: str, path: str) -> None:
    """What `export`, `run` and `inspect` do first with a file of this kind."""
    if kind == "gguf":
        from edge_infer.export.gguf_arch import SUPPORTED_ARCHS
        from edge_infer.export.gguf_file import gguf_to_hf, read_gguf

        g = read_gguf(path)
        if g.metadata.get("general.architecture") in SUPPORTED_ARCHS:
            _, weights, _ = gguf_to_hf(g)
            for t in list(weights.values())[:4]:
                t.dequantize()
        else:
            for t in list(g.tensors.values())[:4]:
                t.dequantize()
    elif kind == "safetensors":
        from edge_infer.export.checkpoint import SafetensorsFile

        f = SafetensorsFile(Path(path))
        for name in f.entries:
            f.get(name)
    elif kind == "manifest":
        from edge_infer.runtime.manifest import load_manifest

        load_manifest(path, verify=True)
    elif kind == "tokenizer":
        from edge_infer.runtime.manifest import TokenizerSpec
        from edge_infer.runtime.tokenizer import Tokenizer

        tok = Tokenizer(Path(path), TokenizerSpec("tokenizer.json", None, (), None))
        tok.decode(tok.encode(SAMPLE + "a" * 5000 + "b"))
    else:
        raise ValueError(kind)


def _child() -> None:
    import resource

    cap = int(os.environ.get("BOUNDED_MEMORY", MEMORY_CAP))
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    from edge_infer.contract.errors import UserError

    for case_id, kind, path in json.load(sys.stdin):
        print(json.dumps({"start": case_id}), flush=True)
        try:
            parse(kind, path)
            out = {"status": "ok"}
        except UserError as e:
            out = {"status": "clean", "error": type(e).__name__, "message": str(e)}
        except BaseException as e:  # noqa: BLE001 - a panic or MemoryError is exactly what we look for
            out = {"status": "crash", "error": type(e).__name__, "message": str(e)[:500]}
        print(json.dumps({"case": case_id, **out}), flush=True)


def run_cases(cases: list[tuple[str, str, str]], timeout: float = 120.0,
              memory: int = MEMORY_CAP) -> dict[str, Outcome]:
    """case_id -> Outcome, running the cases in one child; a case that kills or hangs the child is
    reported and the rest run in a fresh child."""
    results: dict[str, Outcome] = {}
    todo = list(cases)
    env = {**os.environ, "BOUNDED_MEMORY": str(memory), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    while todo:
        status, stderr = "killed", ""
        try:
            proc = subprocess.run([sys.executable, __file__, "--child"], input=json.dumps(todo), text=True,
                                  capture_output=True, timeout=timeout, env=env)
            out, died, stderr = proc.stdout, proc.returncode != 0, proc.stderr
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            died, status = True, "timeout"
        started = None
        for line in out.splitlines():
            rec = json.loads(line)
            if "start" in rec:
                started = rec["start"]
            else:
                results[rec["case"]] = Outcome(rec["status"], rec.get("error", ""), rec.get("message", ""))
                started = None
        if not died:
            break
        if started is None:  # died before the first case: a broken harness, not a finding
            raise RuntimeError(f"the bounded child failed before any case: {stderr[-2000:]}")
        results[started] = Outcome(status, message=stderr[-300:])
        todo = [c for c in todo if c[0] not in results]
    return results


if __name__ == "__main__":
    if sys.argv[1:] == ["--child"]:
        _child()
    else:
        for k, v in run_cases(json.load(sys.stdin)).items():
            print(k, v)
