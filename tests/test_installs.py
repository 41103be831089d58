"""Two onnxruntime builds installed at once: found from their dist-info records in temporary site folders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from edge_infer.devices.installs import collision, describe_installs, onnxruntime_installs


def fake_dist(site: Path, name: str, version: str, files: tuple[str, ...] = ("onnxruntime/__init__.py",)) -> None:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "RECORD").write_text("".join(f"{f},,\n" for f in files) + f"{info.name}/RECORD,,\n")
    for f in files:
        (site / f).parent.mkdir(parents=True, exist_ok=True)
        (site / f).touch()


def test_two_builds_in_one_folder_collide_and_the_fix_is_named(tmp_path):
    site = tmp_path / "site-packages"
    fake_dist(site, "onnxruntime", "1.32.0")
    fake_dist(site, "onnxruntime-gpu", "1.31.1")
    fake_dist(site, "onnxruntime-qnn", "2.7.0", ("onnxruntime_qnn/__init__.py",))  # a plugin, not a build
    fake_dist(site, "onnxruntime-genai", "0.18.0", ("onnxruntime_genai/__init__.py",))
    installs = onnxruntime_installs([str(site)])
    assert sorted(i.name for i in installs) == ["onnxruntime", "onnxruntime-gpu"]
    problem = collision(installs)
    assert problem is not None
    assert "2 onnxruntime builds are installed in" in problem and "onnxruntime-gpu 1.31.1" in problem
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in problem


def test_one_build_per_folder_is_fine_and_the_imported_one_is_named(tmp_path):
    first, second = tmp_path / "venv-npu", tmp_path / "venv"
    fake_dist(first, "onnxruntime-openvino", "1.24.1")
    fake_dist(second, "onnxruntime", "1.32.0")
    installs = onnxruntime_installs([str(first), str(second)])
    assert [i.name for i in installs] == ["onnxruntime-openvino", "onnxruntime"]  # sys.path order
    assert collision(installs) is None
    lines = describe_installs(installs, (first / "onnxruntime" / "__init__.py").resolve())
    assert lines[0].endswith("(imported)") and lines[1].endswith("(shadowed)")


def test_devices_command_reports_a_collision_and_fails(tmp_path):
    site = tmp_path / "site-packages"
    fake_dist(site, "onnxruntime", "1.32.0")
    fake_dist(site, "onnxruntime-directml", "1.24.4")
    # the fake folder last on sys.path: the real onnxruntime is still the one imported
    code = f"import sys; sys.path.append({str(site)!r})\nfrom edge_infer.cli import main; main(['devices'])"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "problem: 2 onnxruntime builds are installed in" in run.stderr
    assert "pip uninstall -y onnxruntime onnxruntime-directml" in run.stderr
    assert "device    provider" in run.stdout  # the table is still printed
    clean = subprocess.run([sys.executable, "-m", "edge_infer.cli", "devices"], capture_output=True, text=True,
                           timeout=120)
    assert clean.returncode == 0 and "problem:" not in clean.stderr and "(imported)" in clean.stdout
