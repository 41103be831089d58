"""The front door stays light: `--help` loads no onnxruntime or jinja2, and a runtime-only
install needs none of the libraries GGUF reading brings (PyYAML, requests, tqdm)."""

import json
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPORT_ONLY = ("gguf", "yaml", "requests", "tqdm")


def run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_help_imports_no_session_or_template_engine():
    got = run(textwrap.dedent("""
        import contextlib, io, json, sys
        from edge_infer.cli import main
        with contextlib.redirect_stdout(io.StringIO()) as out:
            try:
                main(["--help"])
            except SystemExit:
                pass
        loaded = sorted(m for m in ("onnxruntime", "jinja2", "onnx", "tokenizers", "numpy") if m in sys.modules)
        print(json.dumps({"loaded": loaded, "usage": "Usage:" in out.getvalue()}))
    """))
    assert got == {"loaded": [], "usage": True}


def test_public_names_resolve_lazily():
    got = run(textwrap.dedent("""
        import json, sys
        import edge_infer
        before = "onnxruntime" in sys.modules
        load, err = edge_infer.load, edge_infer.UserError
        print(json.dumps({"before": before, "after": "onnxruntime" in sys.modules,
                          "all": sorted(edge_infer.__all__) == sorted(dir(edge_infer)),
                          "err": err.__name__}))
    """))
    assert got == {"before": False, "after": True, "all": True, "err": "UserError"}
    missing = subprocess.run([sys.executable, "-c", "import edge_infer; edge_infer.nope"], capture_output=True, text=True)
    assert "has no attribute 'nope'" in missing.stderr


def test_base_dependencies_leave_gguf_to_the_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"]).lower()
    assert not any(name in base for name in EXPORT_ONLY)
    assert any(d.startswith("gguf") for d in project["optional-dependencies"]["gguf"])
    assert any(d.startswith("gguf") for d in project["optional-dependencies"]["export"])
    assert isinstance(project["license"], str)  # an SPDX string: no setuptools deprecation warning


def test_load_and_generate_without_export_only_libraries(tiny_exports):
    path = tiny_exports("llama", "int4")
    blocked = repr(EXPORT_ONLY)
    got = run(textwrap.dedent(f"""
        import json, sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in {blocked}:
                    raise ImportError(f'{{name}} is blocked in this test')
        sys.meta_path.insert(0, Block())
        import edge_infer
        m = edge_infer.load({str(path)!r}, device="cpu")
        text = edge_infer.generate(m, "hello", max_tokens=4)
        print(json.dumps({{"text": isinstance(text, str)}}))
    """))
    assert got == {"text": True}


def test_gguf_export_without_the_gguf_package_says_what_to_install(tmp_path):
    got = run(textwrap.dedent(f"""
        import json, sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] == 'gguf':
                    raise ImportError('blocked')
        sys.meta_path.insert(0, Block())
        from edge_infer.export.sources import open_source
        from edge_infer.contract.errors import UserError
        p = {str(tmp_path / 'm.gguf')!r}
        open(p, 'wb').write(b'GGUF')
        try:
            open_source(p)
            print(json.dumps({{"error": None}}))
        except UserError as e:
            print(json.dumps({{"error": str(e)}}))
    """))
    assert "edge-infer[gguf]" in got["error"]
