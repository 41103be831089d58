"""Carry a model to another machine: `pack` writes one tar archive, `import` reads an archive or a
folder into the store, every file's sha256 checked against the manifest on the way in.

    edge-infer-pack.json        {"format": "edge-infer-pack", "version": 1, "name": "smol:latest"}
    model/manifest.json
    model/<each file the manifest lists>

Import reads the archive as a stream and trusts nothing in it: the pack record and the manifest
come first, then only regular files the manifest lists, each of exactly its listed size (so an
archive cannot unpack more than the manifest promises), each hashed while it is written. Links,
devices, `..`, absolute names, unlisted and repeated members are refused. Everything is written
into a hidden folder beside the target (export/atomic.py) that becomes the stored model only
once every file matched; a refused import leaves nothing in the store. What the hashes cannot
show is a manifest edited together with its files: the archive is as trustworthy as its source.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from edge_infer.contract.errors import ModelFileError, UserError
from edge_infer.contract.model_folder import MANIFEST
from edge_infer.contract.model_store import ModelName, folder_of, is_name, parse_name
from edge_infer.export.atomic import atomic_folder
from edge_infer.runtime.manifest import load_manifest

PACK_INFO = "edge-infer-pack.json"
PACK_FORMAT = "edge-infer-pack"
PACK_VERSION = 1
MODEL_DIR = "model"
_SMALL = 16 << 20  # the pack record and the manifest are read whole: bounded


def pack(ref: str, file: str | Path, force: bool = False) -> Path:
    """Write the model `ref` (a store name or a folder) to the tar archive `file`, verified first."""
    m = load_manifest(ref, verify=True)  # a damaged model is not carried anywhere
    file = Path(file)
    if file.exists() and not force:
        raise UserError(f"{file}: already exists; choose another file or pass --force")
    name = str(parse_name(str(ref))) if is_name(str(ref)) and not Path(ref).exists() else _folder_name(m.folder)
    record = json.dumps({"format": PACK_FORMAT, "version": PACK_VERSION, "name": name}).encode()
    tmp = file.with_name(f".{file.name}.partial-{os.getpid()}")
    try:
        with _open_for_writing(tmp, gzip=file.name.endswith((".gz", ".tgz"))) as tar:
            _add_bytes(tar, PACK_INFO, record)
            for rel in [MANIFEST, *sorted(m.files)]:
                tar.add(m.folder / rel, arcname=f"{MODEL_DIR}/{rel}", recursive=False, filter=_plain)
        tmp.replace(file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return file


def _open_for_writing(path: Path, gzip: bool) -> tarfile.TarFile:
    if gzip:
        return tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT)
    return tarfile.open(path, "w", format=tarfile.PAX_FORMAT)


def _folder_name(folder: Path) -> str | None:
    name = folder.resolve().name.lower()
    return str(parse_name(name)) if is_name(name) else None


def _plain(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o644
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    import io

    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(_plain(info), io.BytesIO(data))


def import_model(path: str | Path, name: str | None = None, force: bool = False) -> ModelName:
    """Import an archive written by `pack`, or a model folder, into the store; returns its name."""
    path = Path(path)
    if path.is_dir():
        target = _target(name, _folder_name(path), path)
        import_folder(path, target, force)
        return target
    if not path.is_file():
        raise UserError(f"{path}: no such archive or model folder")
    if not tarfile.is_tarfile(path):
        raise ModelFileError(f"{path}: not a tar archive written by `edge-infer pack` (nor a model folder)")
    with tarfile.open(path, "r:*") as tar:
        record = _pack_record(tar, path)
        target = _target(name, record.get("name"), path)
        with _into_store(target, force) as tmp:
            _unpack(tar, path, tmp)
    return target


def import_folder(src: Path, target: ModelName, force: bool = False) -> Path:
    """Copy a model folder into the store as `target`, each file hashed as it is copied."""
    m = load_manifest(src, verify=False)  # the manifest's own checks (schema, names inside the folder)
    with _into_store(target, force) as tmp:
        (tmp / MANIFEST).write_bytes((m.folder / MANIFEST).read_bytes())
        for rel, entry in sorted(m.files.items()):
            source = m.folder / rel
            if source.is_symlink() or not source.is_file():
                raise ModelFileError(f"{source}: missing or a link (listed in {MANIFEST}); nothing was imported")
            with open(source, "rb") as f:
                _write_checked(f, tmp, rel, entry, str(source))
    return folder_of(target)


def _target(name: str | None, recorded: str | None, path: Path) -> ModelName:
    if name is None and recorded is None:
        raise UserError(f"{path}: carries no usable model name; give one with --name NAME")
    return parse_name(name if name is not None else str(recorded))


@contextmanager
def _into_store(target: ModelName, force: bool) -> Iterator[Path]:
    """atomic_folder for a store name; a failure also leaves no empty name folder behind."""
    out = folder_of(target)
    if out.exists() and not force:
        raise UserError(f"{target}: is already in the store; pass --force to replace it, or --name another name")
    had_parent = out.parent.exists()
    try:
        with atomic_folder(out, force) as tmp:
            yield tmp
    except BaseException:
        if not had_parent:
            try:
                out.parent.rmdir()
            except OSError:
                pass
        raise


def _pack_record(tar: tarfile.TarFile, path: Path) -> dict:
    first = tar.next()
    if first is None or first.name != PACK_INFO or not first.isfile() or first.size > _SMALL:
        raise ModelFileError(f"{path}: does not start with {PACK_INFO}; not an archive written by `edge-infer pack`")
    try:
        record = json.loads(_read_member(tar, first))
    except ValueError as e:
        raise ModelFileError(f"{path}: {PACK_INFO} is not valid JSON ({e})") from None
    if not isinstance(record, dict) or record.get("format") != PACK_FORMAT:
        raise ModelFileError(f"{path}: {PACK_INFO} is not an edge-infer pack record")
    if record.get("version") != PACK_VERSION:
        raise ModelFileError(f"{path}: pack version {record.get('version')!r} is not supported (this edge-infer "
                             f"reads version {PACK_VERSION}); upgrade edge-infer")
    return record


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(member)
    assert f is not None  # a regular file
    return f.read()


def _unpack(tar: tarfile.TarFile, path: Path, tmp: Path) -> None:
    """The manifest, then exactly the files it lists, each checked; raises on anything else."""
    member = tar.next()
    if member is None or member.name != f"{MODEL_DIR}/{MANIFEST}" or not member.isfile() or member.size > _SMALL:
        raise ModelFileError(f"{path}: the second member must be {MODEL_DIR}/{MANIFEST}; nothing was imported")
    (tmp / MANIFEST).write_bytes(_read_member(tar, member))
    expected = load_manifest(tmp, verify=False).files  # the manifest's own checks: schema, names inside
    seen: set[str] = set()
    while (member := tar.next()) is not None:
        rel = member.name[len(MODEL_DIR) + 1:] if member.name.startswith(f"{MODEL_DIR}/") else ""
        if rel not in expected or rel in seen or not member.isfile():
            what = "a link or special file" if not member.isfile() else (
                "listed twice" if rel in seen else f"not listed in {MANIFEST}")
            raise ModelFileError(f"{path}: member {member.name!r} is {what}; refusing the archive, nothing "
                                 "was imported")
        if member.size != int(expected[rel]["size"]):
            raise ModelFileError(f"{path}: {rel} is {member.size} bytes, its manifest says {expected[rel]['size']}; "
                                 "nothing was imported")
        f = tar.extractfile(member)
        assert f is not None
        _write_checked(f, tmp, rel, expected[rel], f"{path}: {rel}")
        seen.add(rel)
    missing = sorted(set(expected) - seen)
    if missing:
        raise ModelFileError(f"{path}: lacks {', '.join(missing[:3])} (listed in {MANIFEST}); nothing was imported")


def _write_checked(f: IO[bytes], tmp: Path, rel: str, entry: dict, label: str, chunk: int = 1 << 22) -> None:
    """Copy `f` to tmp/rel, hashing as it goes; refuse a size or sha256 other than the manifest's."""
    dest = tmp / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    h, size = hashlib.sha256(), 0
    with open(dest, "xb") as out:
        while block := f.read(chunk):
            size += len(block)
            if size > int(entry["size"]):
                break
            h.update(block)
            out.write(block)
    if size != int(entry["size"]) or h.hexdigest() != entry["sha256"]:
        raise ModelFileError(f"{label}: sha256 or size does not match {MANIFEST} (changed or corrupt in transit); "
                             "refusing it, nothing was imported")
