"""What the store holds (`edge-infer list`), and removing and copying stored models.

A copy goes through export/atomic.py like an export: a folder at the target name is the finished
copy or nothing. A removal first renames the folder to a hidden sibling (`.TAG.removing-PID`), so a
loader sees the model or no model, never a half-deleted one; hidden leftovers are swept by the next
removal under that name.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from edge_infer.contract.errors import ModelFileError, UserError
from edge_infer.contract.model_folder import MANIFEST
from edge_infer.contract.model_store import ModelName, folder_of, not_stored, parse_name, stored_names
from edge_infer.runtime.manifest import load_manifest


@dataclass(frozen=True)
class Entry:
    """One stored model as `edge-infer list` and `/v1/models` show it (read from its manifest)."""

    name: ModelName
    folder: Path
    architecture: str
    quantization: str
    size_bytes: int  # every file the manifest lists, plus the manifest
    kv_bytes: int  # KV cache of one sequence at the exported max_length
    source: str
    task: str = "generate"  # or "embed": an embedding model (no KV cache)
    problem: str | None = None  # set when the manifest cannot be read (the other fields are blank)


def entry(name: ModelName) -> Entry:
    folder = folder_of(name)
    try:
        m = load_manifest(folder, verify=False)
    except ModelFileError as e:
        return Entry(name, folder, "?", "?", 0, 0, "?", problem=str(e))
    size = sum(int(f["size"]) for f in m.files.values()) + (folder / MANIFEST).stat().st_size
    return Entry(name, folder, m.geometry.architecture, m.quant_scheme, size, m.kv_bytes(),
                 str(m.source.get("description", "?")), m.task)


def entries() -> list[Entry]:
    return [entry(n) for n in stored_names()]


def stored_folder(text: str) -> tuple[ModelName, Path]:
    """A stored model's name and folder; the close-names error when the store does not hold it."""
    name = parse_name(text)
    folder = folder_of(name)
    if not (folder / MANIFEST).is_file():
        raise not_stored(text)
    return name, folder


def remove(text: str) -> Path:
    """Remove a stored model (and its name's folder once no tag is left); returns where it was."""
    name, folder = stored_folder(text)
    trash = folder.with_name(f".{folder.name}.removing-{os.getpid()}")
    folder.rename(trash)
    for leftover in folder.parent.glob(f".{folder.name}.removing-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        folder.parent.rmdir()  # only when empty
    except OSError:
        pass
    return folder


def copy(src: str, dst: str, force: bool = False) -> Path:
    """Copy stored model `src` (or a model folder path) to the store name `dst`, hashes verified."""
    from edge_infer.export.store.archive import import_folder

    source = load_manifest(src, verify=False).folder
    target = parse_name(dst)
    if folder_of(target).resolve() == source.resolve():
        raise UserError(f"{dst}: is the model being copied; choose another name")
    return import_folder(source, target, force=force)


def human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB"):
        n_unit = n / 1024 ** ("KiB", "MiB", "GiB").index(unit) / 1024
        if n_unit < 1024 or unit == "GiB":
            return f"{n_unit:.1f} {unit}"
    return f"{n} B"
