"""The folders install as subpackages of one import package: nothing generic lands in site-packages."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_only_the_edge_infer_package(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(tmp_path.glob("edge_infer-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"edge_infer", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    for sub in ("export", "export/arch", "runtime", "quantize", "devices", "serve", "contract", "bench"):
        assert f"edge_infer/{sub}/__init__.py" in names, sub
    assert "edge_infer/cli.py" in names and "edge_infer/runtime/model.py" in names
    # `edge-infer bench` and `eval` measure with the shipped text when given none: it installs with the code.
    assert "edge_infer/bench/measure.py" in names and "edge_infer/bench/text/01-lighthouse.txt" in names
    # The chat page at / ships inside the package: no build step, nothing fetched at run time.
    for name in ("index.html", "chat.js", "markdown.js", "chat.css"):
        assert f"edge_infer/serve/ui/{name}" in names, name
