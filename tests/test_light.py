"""The runtime stays light and offline: no torch/transformers, no sockets; export works without torch."""

import json
import subprocess
import sys
import textwrap

BLOCKER = textwrap.dedent("""
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0] in ('torch', 'transformers', 'optimum'):
                raise ImportError(f'{name} is blocked in this test')
    sys.meta_path.insert(0, Block())
""")


def run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_load_and_generate_import_no_heavy_modules(tiny_exports):
    path = tiny_exports("llama", "int4")
    got = run(textwrap.dedent(f"""
        import json, sys
        import edge_infer
        m = edge_infer.load({str(path)!r}, device="cpu")
        text = edge_infer.generate(m, "hello", max_tokens=8)
        heavy = sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'transformers', 'optimum'))
        print(json.dumps({{"heavy": heavy, "n": len(text) >= 0}}))
    """))
    assert got == {"heavy": [], "n": True}


def test_export_with_torch_and_transformers_blocked(tiny_checkpoints, tmp_path):
    src, out = tiny_checkpoints("qwen2"), tmp_path / "m"
    got = run(BLOCKER + textwrap.dedent(f"""
        import json
        from edge_infer.export.export_folder import ExportOptions, export_model
        export_model({str(src)!r}, {str(out)!r}, ExportOptions(quant="int4", max_length=64))
        import edge_infer
        m = edge_infer.load({str(out)!r}, device="cpu")
        print(json.dumps({{"validation": m.manifest.validation, "text": isinstance(edge_infer.generate(m, "hi", max_tokens=4), str)}}))
    """))
    assert got["text"] is True
    assert "top1_agreement" in got["validation"]  # int4 vs fp32 needs no transformers


def test_fp32_export_without_transformers_records_skipped_validation(tiny_checkpoints, tmp_path):
    src, out = tiny_checkpoints("llama"), tmp_path / "m"
    got = run(BLOCKER + textwrap.dedent(f"""
        import json
        from edge_infer.export.export_folder import ExportOptions, export_model
        from edge_infer.runtime.manifest import load_manifest
        export_model({str(src)!r}, {str(out)!r}, ExportOptions(quant="fp32", max_length=64))
        print(json.dumps(load_manifest({str(out)!r}).validation))
    """))
    assert got["source_comparison"].startswith("skipped: transformers is not installed")


def test_generate_with_network_sockets_disabled(tiny_exports, monkeypatch):
    import socket

    import edge_infer

    def refuse(*args, **kwargs):
        raise AssertionError("edge-infer opened a network socket")

    path = tiny_exports("gemma2", "int8")
    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    m = edge_infer.load(path, device="cpu")
    chunks = list(edge_infer.stream_generate(m, [{"role": "user", "content": "hi"}], max_tokens=6))
    assert chunks[-1].finish_reason is not None
