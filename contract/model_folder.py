"""The model folder on disk: its file names, and the manifest's envelope and hashes.

Export and quantize write a folder, the runtime reads it: both take the names and the
manifest's `format` / `format_version` from here. What a manifest's sections mean is read by
runtime/manifest.py (and checked by runtime/manifest_schema.py); how it is written is here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

# progress(done, total): bytes hashed so far of all the files being hashed
BytesProgress = Callable[[int, int], None]

MANIFEST = "manifest.json"
FORMAT = "edge-infer"
# 2: graph headers chosen by the installed onnxruntime (graph.headers), every shared-cache graph takes
# logits_to_keep and pads one-token attention itself. Folders of version 1 are refused: re-export.
FORMAT_VERSION = 2
GRAPH_FILE = "model.onnx"
COMPAT_GRAPH_FILE = "model.compat.onnx"  # the same graph for onnxruntime before 1.32 (export/graph_headers.py)
DATA_FILE = "model.onnx.data"
TOKENIZER_FILE = "tokenizer.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
INLINE_BELOW = 1024  # bytes: smaller tensors stay inside the graph's protobuf, larger go to DATA_FILE


def sha256_file(path: Path, chunk: int = 1 << 22, read: Callable[[int], None] | None = None) -> str:
    """The file's sha256; `read(n)` after each block of n bytes (progress)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if read is not None:
                read(len(block))
    return h.hexdigest()


def file_entry(path: Path, read: Callable[[int], None] | None = None) -> dict[str, Any]:
    return {"sha256": sha256_file(path, read=read), "size": path.stat().st_size}


def hashing_counter(paths: list[Path], progress: BytesProgress | None) -> Callable[[int], None] | None:
    """A `read(n)` for sha256_file that reports the bytes hashed over all of `paths` to `progress`."""
    if progress is None:
        return None
    total = sum(p.stat().st_size for p in paths)
    done = [0]
    progress(0, total)

    def read(n: int) -> None:
        done[0] += n
        progress(done[0], total)

    return read


def write_manifest(folder: Path, body: dict[str, Any], progress: BytesProgress | None = None) -> Path:
    """Hash every file in `folder` into `body` and write the manifest (call this last)."""
    paths = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST]
    read = hashing_counter(paths, progress)
    files = {p.relative_to(folder).as_posix(): file_entry(p, read) for p in paths}
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, **body, "files": files}
    path = folder / MANIFEST
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
