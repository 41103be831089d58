"""Read a local Hugging Face checkpoint folder: config.json and safetensors, no torch.

Only safetensors are read. A folder holding pickle weights only is refused:
unpickling runs arbitrary code (CVE-2025-32434), so we never do it.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from edge_infer.export.arch._common import Take
from edge_infer.contract.errors import ModelFileError

PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "tf_model.h5")
MAX_HEADER = 100 * 1024 * 1024
_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.uint16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class WeightSource(Protocol):
    def names(self) -> set[str]: ...

    def get(self, name: str) -> np.ndarray: ...  # float32

    def blocks(self, name: str): ...  # quantized blocks (GGUF) or None


class SafetensorsFile:
    """One .safetensors file, memory-mapped; every offset checked against the file size."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelFileError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise ModelFileError(f"{path}: corrupt safetensors header (header size {n}, file size {size})")
            try:
                header = json.loads(f.read(n), object_pairs_hook=_unique_keys)
            except (ValueError, RecursionError) as e:  # also a duplicate key, a 5,000-digit number
                raise ModelFileError(f"{path}: corrupt safetensors header ({e})") from None
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else b""
        if not isinstance(header, dict):
            raise ModelFileError(f"{path}: corrupt safetensors header (a JSON object was expected)")
        self.data_start = 8 + n
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            if name == "__metadata__":
                if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                    raise ModelFileError(f"{path}: corrupt safetensors __metadata__ (string values expected)")
                continue
            self.entries[name] = _entry(path, name, info, size - self.data_start)
        _check_packed(path, self.entries, size - self.data_start)

    def get(self, name: str) -> np.ndarray:
        return self.get_rows(name, 0, None)

    def get_rows(self, name: str, start: int, stop: int | None) -> np.ndarray:
        """Rows start:stop (axis 0) of a tensor in float32; only their bytes are read."""
        dtype, shape, begin, end = self.entries[name]
        raw: np.ndarray = np.frombuffer(self._map, dtype=_DTYPES[dtype],
                                        count=(end - begin) // np.dtype(_DTYPES[dtype]).itemsize,
                                        offset=self.data_start + begin).reshape(shape)
        if shape:
            raw = raw[start:stop]
        if dtype == "BF16":  # bfloat16 is the top half of a float32
            out = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            out = raw.astype(np.float32)
        del raw
        self._release(self.data_start + begin, self.data_start + end)
        return out

    def _release(self, start: int, end: int) -> None:
        """Unmap the pages just read (they stay in the page cache): touched pages of a map count in
        the process's RSS until unmapped, and a 2 GB checkpoint read tensor by tensor would
        otherwise end up wholly resident."""
        if isinstance(self._map, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
            start -= start % mmap.PAGESIZE
            self._map.madvise(mmap.MADV_DONTNEED, start, min(end, len(self._map)) - start)


class DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose keys are all distinct (json.loads would keep the last of two silently)."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise DuplicateKey(f"duplicate key {key!r}")
        seen.add(key)
    return dict(pairs)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _entry(path: Path, name: str, info: object, data_size: int) -> tuple[str, tuple[int, ...], int, int]:
    """One tensor's (dtype, shape, begin, end), every field typed and inside the data section."""
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise ModelFileError(f"{path}: corrupt safetensors entry for '{name}' (dtype, shape, data_offsets expected)")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise ModelFileError(f"{path}: tensor '{name}' has unsupported dtype {str(dtype)[:40]!r}")
    if not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(d) and d >= 0 for d in shape):
        raise ModelFileError(f"{path}: tensor '{name}' has a bad shape {str(shape)[:60]} "
                             "(at most 8 non-negative integers)")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise ModelFileError(f"{path}: tensor '{name}' has bad data_offsets {str(offsets)[:60]}")
    begin, end = offsets
    itemsize = 2 if dtype == "BF16" else np.dtype(_DTYPES[dtype]).itemsize
    count = math.prod(shape)  # Python ints: no silent int64 overflow
    if begin < 0 or end < begin or end - begin != count * itemsize or end > data_size:
        raise ModelFileError(f"{path}: tensor '{name}' lies outside the file or has the wrong size "
                             "(truncated download?)")
    return dtype, tuple(shape), begin, end


def _check_packed(path: Path, entries: dict[str, tuple[str, tuple[int, ...], int, int]], data_size: int) -> None:
    """Tensors back to back from the start of the data section to the end of the file, as every writer
    lays them out (the safetensors library refuses anything else too): no overlaps, no holes."""
    expected = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin != expected:
            raise ModelFileError(f"{path}: tensor '{name}' starts at data offset {begin}, expected {expected} "
                                 "(tensors overlap or leave a gap); the file is corrupt")
        expected = end
    if expected != data_size:
        raise ModelFileError(f"{path}: the tensors end at data offset {expected} but the data section has "
                             f"{data_size} bytes; the file is corrupt")


class SafetensorsSource:

    def __init__(self, files: list[SafetensorsFile]):
        self._where = {name: f for f in files for name in f.entries}

    def names(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> np.ndarray:
        return self._where[name].get(name)

    def get_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return self._where[name].get_rows(name, start, stop)

    def blocks(self, name: str):
        return None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].entries[name][1]


def open_hf_folder(folder: Path) -> tuple[dict, SafetensorsSource]:
    """config.json and the safetensors weights of a checkpoint folder."""
    if not folder.is_dir():
        raise ModelFileError(f"{folder}: not a folder (expected a Hugging Face checkpoint folder or a .gguf file)")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelFileError(f"{folder}: no config.json; is this a Hugging Face checkpoint folder?")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ModelFileError(f"{config_path}: expected a JSON object")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [n for n in PICKLE_NAMES if (folder / n).exists()] + [p.name for p in folder.glob("pytorch_model-*.bin")]
        if pickles:
            raise ModelFileError(
                f"{folder}: holds only pickle weights ({', '.join(sorted(pickles))}); edge-infer reads safetensors "
                "only because unpickling can run arbitrary code. Convert it once in a trusted environment, e.g. "
                "`python -c \"from transformers import AutoModelForCausalLM as M; "
                "M.from_pretrained('IN').save_pretrained('OUT', safe_serialization=True)\"`, then export OUT."
            )
        raise ModelFileError(f"{folder}: no *.safetensors weight files found")
    return config, SafetensorsSource([SafetensorsFile(p) for p in files])


def materialize(recipe: dict[str, Take], source: WeightSource) -> tuple[dict[str, Any], dict[str, Any]]:
    """Canonical float32 weights, plus quantized source blocks for weights that kept them, all in memory.

    The second dict maps a canonical name to its concatenated source blocks, so a
    GGUF's Q4_0/Q4_1/Q8_0 weights can reach MatMulNBits without a second rounding.
    The export streams instead (`LazyWeights`); this eager form suits small models and tests.
    """
    lazy = LazyWeights(recipe, source)
    weights, blocks = {}, {}
    for name in recipe:
        weights[name] = lazy[name]
        found, b = lazy.blocks(name)
        if found:
            blocks[name] = b
    return weights, blocks


class LazyWeights(Mapping):
    """Canonical float32 weights computed from the source when asked, never kept: a graph builder
    that takes each weight once holds one at a time (the source stays memory-mapped)."""

    def __init__(self, recipe: dict[str, Take], source: WeightSource):
        have = source.names()
        missing = sorted({s for t in recipe.values() for s in t.sources} - have)
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ModelFileError(f"checkpoint is missing weights the architecture needs: {shown}")
        self.recipe, self.source = recipe, source
        # When set, weights without a transform come back as `Deferred`: nothing is read until
        # someone needs the values (the quantizer, or validation), and then one weight at a time.
        self.deferred = False

    def __getitem__(self, name: str) -> np.ndarray | Deferred:  # Deferred: see `deferred`
        t = self.recipe[name]
        shape_of = getattr(self.source, "shape", None)
        if self.deferred and t.transform is None and shape_of is not None:
            shapes = [tuple(shape_of(s)) for s in t.sources]
            shape = (sum(s[0] for s in shapes),) + shapes[0][1:]
            rows = None
            if len(t.sources) == 1 and hasattr(self.source, "get_rows") and len(shape) == 2:
                rows = lambda start, stop: self.source.get_rows(t.sources[0], start, stop)  # noqa: E731
            return Deferred(lambda: self.compute(name), shape, rows=rows)
        return self.compute(name)

    def compute(self, name: str) -> np.ndarray:
        t = self.recipe[name]
        parts = [self.source.get(s) for s in t.sources]
        w = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        del parts
        return t.transform(w) if t.transform else w

    def __iter__(self):
        return iter(self.recipe)

    def __contains__(self, name: object) -> bool:  # without reading the weight (Mapping's default would)
        return name in self.recipe

    def __len__(self) -> int:
        return len(self.recipe)

    def blocks(self, name: str) -> tuple[bool, object]:
        """(True, the weight's concatenated source blocks or None for mixed types) when every source
        tensor kept quantized blocks; (False, None) when it has none (float sources, a transform)."""
        t = self.recipe[name]
        if t.transform is not None:
            return False, None
        qb = [self.source.blocks(s) for s in t.sources]
        if not all(q is not None for q in qb):
            return False, None
        return True, (qb[0] if len(qb) == 1 else concat_blocks(qb))  # None: mixed types


def concat_blocks(parts: list):
    """Stack quantized blocks of several weights along their rows (out features)."""
    first = parts[0]
    if any(p.bits != first.bits or p.block_size != first.block_size for p in parts):
        return None
    return type(first)(bits=first.bits, block_size=first.block_size,
                       q=np.concatenate([p.q for p in parts]), scales=np.concatenate([p.scales for p in parts]),
                       zero_points=np.concatenate([p.zero_points for p in parts]), k=first.k)


class Deferred:
    """A float weight not read yet: the graph builder's `.T` and `.astype` are recorded, and the values
    are made from the source when they are needed (`materialize`), e.g. by the quantizer, one weight
    at a time. Anything else asked of it (numpy functions, other attributes) materializes it first.
    `rows(start, stop)`, when the source can read part of the weight, gives rows start:stop of the
    untransposed weight (`materialize_rows`), so a vocabulary-sized one can be walked in slices."""

    def __init__(self, compute: Callable[[], np.ndarray], shape: tuple[int, ...], dtype=np.float32,
                 transposed: bool = False, rows: Callable[[int, int], np.ndarray] | None = None):
        self.compute, self.shape, self.dtype, self.transposed = compute, tuple(shape), np.dtype(dtype), transposed
        self.rows = rows
        self.ndim = len(self.shape)

    @property
    def T(self) -> Deferred:  # noqa: N802 (numpy's name)
        return Deferred(self.compute, self.shape[::-1], self.dtype, not self.transposed, self.rows)

    def astype(self, dtype, copy: bool = True) -> Deferred:
        return Deferred(self.compute, self.shape, dtype, self.transposed, self.rows)

    @property
    def row_slices(self) -> bool:
        """Whether `materialize_rows` reads only the rows asked for (else it reads the whole weight)."""
        return self.rows is not None and not self.transposed

    def materialize_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows start:stop of `materialize()`, the same values."""
        if not self.row_slices:
            return self.materialize()[start:stop]
        w = self.rows(start, stop)  # type: ignore[misc]
        stop = min(stop, self.shape[0])
        if w.shape != (max(stop - start, 0),) + self.shape[1:]:
            raise ValueError(f"deferred weight rows {start}:{stop} have shape {w.shape}")
        return w.astype(self.dtype, copy=False)

    def materialize(self) -> np.ndarray:
        w = self.compute()
        w = w.T if self.transposed else w
        if w.shape != self.shape:
            raise ValueError(f"deferred weight has shape {w.shape}, expected {self.shape}")
        return w.astype(self.dtype, copy=False)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        a = self.materialize()
        return a if dtype is None else a.astype(dtype, copy=False)

    def __getattr__(self, name: str):
        if name.startswith("__"):  # numpy probes __array_struct__ etc.: let it use __array__
            raise AttributeError(name)
        return getattr(self.materialize(), name)
