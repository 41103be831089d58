"""Progress everywhere: `edge_infer.export(..., progress=callback)` and `edge_infer.load(...,
progress=callback)` see every stage in order, each counting up to its total; `edge-infer export`
on a terminal draws bars with rate and ETA (tqdm), and is quiet with -q or when not a terminal."""

from __future__ import annotations

import json
import subprocess

import pytest

from terminal import Terminal, edge_infer_argv

import edge_infer

EXPORT_STAGES = ["reading", "building", "quantizing", "writing", "validating", "manifest"]


def stages_of(events: list[tuple[str, int, int]]) -> dict[str, list[tuple[int, int]]]:
    """Stage -> its (done, total) reports; asserts each stage reports in one run, never going back."""
    order: list[str] = []
    for stage, _, _ in events:
        if not order or order[-1] != stage:
            assert stage not in order, f"stage {stage!r} came back after others: {events}"
            order.append(stage)
    by = {s: [(d, t) for name, d, t in events if name == s] for s in order}
    for s, reports in by.items():
        dones = [d for d, _ in reports]
        assert dones == sorted(dones), (s, reports)
        assert reports[-1][0] == reports[-1][1] >= 1, (s, reports)  # ends with done == total
    return by


def test_export_callback_sees_every_stage_in_order(tiny_checkpoints, tmp_path):
    events: list[tuple[str, int, int]] = []
    out = edge_infer.export(tiny_checkpoints("llama"), tmp_path / "m", quant="int4", max_length=64,
                            progress=lambda *e: events.append(e))
    by = stages_of(events)
    assert list(by) == EXPORT_STAGES
    manifest = json.loads((out / "manifest.json").read_text())
    built = by["building"][-1][1]  # the weights the graph takes (fused: qkv, gate_up, ... per layer)
    assert built > 2 * 4 and [d for d, _ in by["building"]] == [0, *range(1, built + 1)]  # one report per weight
    assert len(by["quantizing"]) > 3 and len(by["writing"]) > 3  # counted per weight / tensor, not 0 -> 1
    assert by["manifest"][-1][1] == sum(f["size"] for f in manifest["files"].values())  # bytes hashed
    assert len(by["validating"]) > 2
    with pytest.raises(edge_infer.UserError, match="export\\(\\) has no option 'quantt'"):
        edge_infer.export(tiny_checkpoints("llama"), tmp_path / "n", quantt="int4")


def test_kv_cache_calibration_stages_count_too(tiny_checkpoints, tmp_path):
    events: list[tuple[str, int, int]] = []
    edge_infer.export(tiny_checkpoints("llama"), tmp_path / "m", quant="fp32", max_length=64, kv_cache="int8",
                      validate=False, progress=lambda *e: events.append(e))
    by = stages_of(events)
    assert list(by) == ["reading", "building", "calibrating", "checking", "manifest"]
    assert [d for d, _ in by["calibrating"]] == list(range(0, 2 + 2 + 1))  # two passes, then 2 layers' scales


def test_load_callback_counts_the_bytes_it_verifies(tiny_exports):
    folder = tiny_exports("llama", "fp32")
    events: list[tuple[str, int, int]] = []
    edge_infer.load(folder, device="cpu", threads=1, progress=lambda *e: events.append(e))
    by = stages_of(events)
    assert list(by) == ["verifying", "opening"]
    files = json.loads((folder / "manifest.json").read_text())["files"]
    assert by["verifying"][-1] == (sum(f["size"] for f in files.values()),) * 2
    assert by["opening"] == [(0, 1), (1, 1)]


def test_export_draws_bars_on_a_terminal_and_is_quiet_otherwise(tiny_checkpoints, tmp_path):
    args = ["export", tiny_checkpoints("llama"), "--quant", "int8", "--max-length", "64"]
    term = Terminal(edge_infer_argv(*args, "-o", tmp_path / "a"))
    try:
        assert term.wait() == 0
    finally:
        term.close()
    screen = term.text()
    # tqdm's bars: count/total, elapsed<ETA and a rate, for the weights built, quantized and written
    for label, unit in (("building graph", "weight"), ("quantizing to int8", "weight"), ("writing model", "tensor"),
                        ("writing manifest", "B")):
        assert any(label in line and "100%" in line and "<" in line and f"{unit}/s" in line
                   for line in screen.splitlines()), (label, screen)

    quiet = Terminal(edge_infer_argv(*args, "-o", tmp_path / "b", "-q"))
    try:
        assert quiet.wait() == 0
    finally:
        quiet.close()
    assert quiet.text().strip() == ""

    piped = subprocess.run(edge_infer_argv(*args, "-o", tmp_path / "c"), capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0 and "quantizing to int8" in piped.stderr and "%|" not in piped.stderr
