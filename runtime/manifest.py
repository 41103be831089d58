"""The manifest: everything the runtime needs to know about an exported model.

`manifest.json` sits beside the graph and is written last at export. The runtime
never infers anything from file names or by probing the graph; an unknown
format version is refused. Every file's sha256 and size is recorded and checked
at load, so a truncated download, an edited file or a Git-LFS pointer is named.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_infer.contract.embedding import TASK_EMBED, EmbeddingRecord
from edge_infer.contract.errors import ModelFileError
from edge_infer.contract.model_folder import (FORMAT, FORMAT_VERSION, MANIFEST, BytesProgress, hashing_counter,
                                             sha256_file)
from edge_infer.contract.model_store import resolve_model
from edge_infer.contract.io_names import POSITION_IDS
from edge_infer.contract.graph_record import GraphHeader, GraphRecord, kv_cache_bytes, kv_storage
from edge_infer.contract.quantization import QuantRecord
from edge_infer.runtime.manifest_schema import check_raw

LFS_POINTER = b"version https://git-lfs.github.com/spec/"


@dataclass(frozen=True)
class Geometry:
    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_length: int  # KV-cache length the graph was exported for
    context_length: int  # the model's own trained context
    sliding_window: int | None = None


@dataclass(frozen=True)
class TokenizerSpec:
    file: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    bos_token: str | None = None
    eos_token: str | None = None
    chat_template_file: str | None = None
    chat_template_origin: str | None = None  # "model", "built-in NAME" or "file NAME" (runtime/template_library.py)


@dataclass(frozen=True)
class GenerationDefaults:
    max_new_tokens: int | None = None  # what an export suggests when a request names no max_tokens
    source_defaults: dict[str, Any] = field(default_factory=dict)  # the source's generation_config.json

    @classmethod
    def from_manifest(cls, raw: dict[str, Any]) -> GenerationDefaults:
        return cls(raw.get("max_new_tokens"), dict(raw.get("source_defaults") or {}))


@dataclass(frozen=True)
class Manifest:
    folder: Path
    geometry: Geometry
    graph: GraphRecord
    quantization: QuantRecord
    tokenizer: TokenizerSpec
    generation: GenerationDefaults
    source: dict[str, Any]
    validation: dict[str, Any]
    files: dict[str, dict[str, Any]]
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def graph_file(self) -> str:
        return self.graph.file

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.graph.inputs

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.graph.outputs

    @property
    def dtype(self) -> str:
        """Weights and activations: fp32 | fp16."""
        return self.graph.dtype

    @property
    def task(self) -> str:
        """"generate" (logits), or "embed" (last_hidden_state, pooled by runtime/embed.py as `embedding` says)."""
        return TASK_EMBED if self.raw.get("task") == TASK_EMBED else "generate"

    @property
    def embedding(self) -> EmbeddingRecord | None:
        return EmbeddingRecord.from_manifest(self.raw["embedding"]) if self.task == TASK_EMBED else None

    @property
    def kv_layout(self) -> str:
        """"shared": one max_length buffer bound as past and present; "concat": optimum-style growth."""
        return self.graph.kv_layout or "shared"

    @property
    def headers(self) -> tuple[GraphHeader, ...]:
        """The graph headers over the weights, best first (graph.headers); one (graph.file) when absent."""
        return self.graph.headers or (GraphHeader(self.graph_file),)

    @property
    def quant_scheme(self) -> str:
        return self.quantization.scheme

    @property
    def uses_position_ids(self) -> bool:
        return POSITION_IDS in self.inputs

    @property
    def kv_dtype(self) -> str:
        """How the KV cache is stored: "fp32" | "fp16" (the graph's dtype), or "int8" | "int4" with the
        per-channel scales in the graph (export --kv-cache)."""
        return str(self.raw.get("kv_cache", {}).get("dtype") or self.dtype)

    @property
    def kv_numpy(self) -> tuple[np.dtype, int]:
        """(numpy dtype, values per head stored per position) of the cache buffers."""
        return kv_storage(self.kv_dtype, self.geometry.head_dim)

    def kv_bytes(self, batch: int = 1, max_length: int | None = None) -> int:
        if self.task == TASK_EMBED:  # an embedding pass keeps no cache
            return 0
        g = self.geometry
        return kv_cache_bytes(self.kv_dtype, g.num_layers, g.num_kv_heads, g.head_dim, max_length or g.max_length, batch)


def load_manifest(ref: str | os.PathLike, verify: bool = True, progress: BytesProgress | None = None) -> Manifest:
    """Read and check `folder/manifest.json`; with `verify`, check every file's size and sha256
    (`progress(done, total)`: bytes hashed, for a bar).

    `ref` is a folder, or a model store name (contract/model_store.py: a path that exists wins)."""
    folder = resolve_model(ref)
    path = folder / MANIFEST
    if not folder.exists():
        raise ModelFileError(f"{folder}: no such model folder")
    if not path.is_file():
        raise ModelFileError(
            f"{folder}: no {MANIFEST}; this is not an edge-infer model folder (or its export did not finish). "
            "Create one with `edge-infer export SRC -o OUT`."
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, a duplicate key, a 5,000-digit number
        raise ModelFileError(f"{path}: not valid JSON ({e}); re-export the model") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not an edge-infer manifest")
    version = raw.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and 0 < version < FORMAT_VERSION:
        raise ModelFileError(f"{path}: exported by an older edge-infer (format version {version}, this one reads "
                             f"{FORMAT_VERSION}); re-export the model with `edge-infer export`")
    if version != FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: manifest format version {version!r} is not supported by this edge-infer "
            f"(it reads version {FORMAT_VERSION}); re-export the model or upgrade edge-infer"
        )
    try:  # a lone surrogate (a "\ud800" escape) anywhere would break printing and tokenizing later
        json.dumps(raw, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise ModelFileError(f"{path}: holds text that is not valid Unicode (at character {e.start} of its "
                             "values); re-export the model") from None
    check_raw(path, raw)  # every field typed and in range before anything is built from it
    try:
        m = _parse(folder, raw)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"{path}: malformed manifest ({type(e).__name__}: {e}); re-export the model") from None
    if verify:
        verify_files(m, progress)
    return m


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key in a JSON object")
    return out


def _parse(folder: Path, raw: dict) -> Manifest:
    g, t, gr = raw["model"], raw["tokenizer"], raw["graph"]
    geometry = Geometry(
        architecture=str(g["architecture"]), num_layers=int(g["num_layers"]), num_heads=int(g["num_heads"]),
        num_kv_heads=int(g["num_kv_heads"]), head_dim=int(g["head_dim"]), hidden_size=int(g["hidden_size"]),
        vocab_size=int(g["vocab_size"]), max_length=int(g["max_length"]), context_length=int(g["context_length"]),
        sliding_window=g.get("sliding_window"),
    )
    tok = TokenizerSpec(
        file=str(t["file"]), bos_token_id=t.get("bos_token_id"),
        eos_token_ids=tuple(int(i) for i in t.get("eos_token_ids", [])), pad_token_id=t.get("pad_token_id"),
        bos_token=t.get("bos_token"), eos_token=t.get("eos_token"), chat_template_file=t.get("chat_template_file"),
        chat_template_origin=t.get("chat_template_origin"),
    )
    files = raw["files"]
    for name in files:
        _check_relative(folder, name)
    graph = GraphRecord.from_manifest(gr)
    headers = tuple(h.file for h in graph.headers or ())
    for name in (graph.file, tok.file, *headers) + ((tok.chat_template_file,) if tok.chat_template_file else ()):
        if name not in files:
            raise ValueError(f"'{name}' is referenced but not listed in files")
    return Manifest(
        folder=folder, geometry=geometry, graph=graph,
        quantization=QuantRecord.from_manifest(raw.get("quantization", {}), graph.dtype),
        tokenizer=tok, generation=GenerationDefaults.from_manifest(raw.get("generation", {})), source=dict(raw.get("source", {})),
        validation=dict(raw.get("validation", {})), files=dict(files), raw=raw,
    )


def _check_relative(folder: Path, name: str) -> None:
    """A listed file must be a plain relative name inside the folder."""
    p = Path(name)
    if p.is_absolute() or ".." in p.parts or name.startswith(("/", "\\")):
        raise ModelFileError(f"{folder / MANIFEST}: file entry '{name}' points outside the model folder")


def verify_files(m: Manifest, progress: BytesProgress | None = None) -> None:
    """Every listed file exists with its recorded size and sha256; names the first that does not."""
    root = m.folder.resolve()
    _check_sizes(m, root)
    read = hashing_counter([m.folder / name for name in m.files], progress)
    for name, entry in m.files.items():
        path = m.folder / name
        if sha256_file(path, read=read) != entry["sha256"]:
            raise ModelFileError(f"{path}: sha256 does not match {MANIFEST} (file changed or corrupt); re-copy it")


def _check_sizes(m: Manifest, root: Path) -> None:
    for name, entry in m.files.items():
        path = m.folder / name
        if not path.is_file():
            raise ModelFileError(f"{path}: missing (listed in {MANIFEST}); re-export or re-copy the model folder")
        if path.is_symlink() or not path.resolve().is_relative_to(root):
            raise ModelFileError(f"{path}: is a link out of the model folder; refusing to read it")
        size = path.stat().st_size
        if size != entry["size"]:
            with open(path, "rb") as f:
                head = f.read(len(LFS_POINTER))
            if head == LFS_POINTER:
                raise ModelFileError(f"{path}: is a Git-LFS pointer, not the file; run `git lfs pull` in that folder")
            raise ModelFileError(
                f"{path}: size {size} bytes, expected {entry['size']} (truncated or changed); re-copy the model"
            )

