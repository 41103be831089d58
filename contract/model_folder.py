"""The model folder on disk: its file names, and the manifest's envelope and hashes.

Export and quantize write a folder, the runtime reads it: both take the names and the
manifest's `format` / `format_version` from here. What a manifest's sections mean is read by
runtime/manifest.py (and checked by runtime/manifest_schema.py); how it is written is here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FORMAT = "edge-infer"
FORMAT_VERSION = 1
GRAPH_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
TOKENIZER_FILE = "tokenizer.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
INLINE_BELOW = 1024  # bytes: smaller tensors stay inside the graph's protobuf, larger go to DATA_FILE


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "size": path.stat().st_size}


def write_manifest(folder: Path, body: dict[str, Any]) -> Path:
    """Hash every file in `folder` into `body` and write the manifest (call this last)."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(folder).as_posix()] = file_entry(p)
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, **body, "files": files}
    path = folder / MANIFEST
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
