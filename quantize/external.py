"""ONNX initializers kept outside the protobuf, written and read one tensor at a time.

A graph of a billion weights cannot be held as numpy arrays, plus their protobuf copies, plus
the serialized model: that was about four times the model in memory (19 GB peak for a 1B
model). Here every initializer is appended to a data file the moment it is produced and the
graph keeps only its location, offset and length (ONNX external data), so building, quantizing
and saving a graph holds one tensor at a time.

Reading uses `readinto` into the tensor's own array rather than a memory map: mapped pages of
a file stay resident and count in the process's RSS until unmapped, so a map over a 4 GB float
graph would grow to 4 GB however carefully it is walked.

Layout matches what `onnx.save_model(..., save_as_external_data=True, size_threshold=1024)`
writes: tensors under `INLINE_BELOW` bytes stay inside the protobuf, larger ones go to the data
file, aligned so onnxruntime can map them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_infer.contract.model_folder import INLINE_BELOW

PAGE = 4096  # tensors of a MiB or more start on a page (onnxruntime maps those)
SMALL_ALIGN = 64
PLACEHOLDER = "(deferred)"  # location of an initializer whose values are computed when read


class DataFile:
    """An external-data file being written: `add` appends one tensor and returns its proto."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = open(self.path, "wb")
        self.offset = 0
        self.deferred: dict[str, Any] = {}
        self._written: set[tuple[str, str, str]] = set()  # (name, offset, length) of each tensor written here

    def add(self, name: str, array: np.ndarray) -> TensorProto:
        a = np.asarray(array)
        a = a if a.flags.c_contiguous else np.ascontiguousarray(a)  # (ascontiguousarray makes scalars 1-D)
        if a.nbytes < INLINE_BELOW or a.dtype == object:
            return numpy_helper.from_array(a, name)
        align = PAGE if a.nbytes >= 1 << 20 else SMALL_ALIGN
        pad = -self.offset % align
        if pad:
            self._f.write(b"\0" * pad)
            self.offset += pad
        self._f.write(a.reshape(-1).view(np.uint8).data)  # (nbytes,) no copy
        t = TensorProto()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(a.dtype)
        t.dims.extend(a.shape)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(a.nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        self._written.add((name, str(self.offset), str(a.nbytes)))
        self.offset += a.nbytes
        return t

    def holds(self, t: TensorProto, folder: Path) -> bool:
        """Whether `t`, read from `folder`, is stored in this file or is one of its deferred tensors.

        A location naming this file means this file when `folder` is this file's folder. From another
        folder it may name that folder's own data file (model.onnx.data, when an exported folder is
        quantized): then only a tensor this file wrote, by name, offset and length, is this file's."""
        if t.data_location != TensorProto.EXTERNAL:
            return False
        info = {e.key: e.value for e in t.external_data}
        if info.get("location") == PLACEHOLDER:
            return t.name in self.deferred
        if info.get("location") != self.path.name:
            return False
        if Path(folder).resolve() == self.path.parent.resolve():
            return True
        return (t.name, info.get("offset", "0"), info.get("length")) in self._written

    def defer(self, name: str, values) -> TensorProto:
        """An initializer whose values are made only when read: `values` is an array-like that
        computes them (np.asarray(values)), e.g. a weight still in the model's source file. The
        proto points nowhere (location PLACEHOLDER); `read_tensor(t, folder, self.deferred)`
        and `save_streamed(..., deferred=self.deferred)` resolve it."""
        t = TensorProto()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(np.dtype(values.dtype))
        t.dims.extend(values.shape)
        t.data_location = TensorProto.EXTERNAL
        entry = t.external_data.add()
        entry.key, entry.value = "location", PLACEHOLDER
        self.deferred[name] = values
        return t

    def move(self, t: TensorProto, folder: Path, deferred: Mapping[str, Any] | None = None) -> TensorProto:
        """`t` (inline, external relative to `folder`, or deferred) stored in this file instead."""
        if t.data_location != TensorProto.EXTERNAL and tensor_nbytes(t) < INLINE_BELOW:
            return t
        return self.add(t.name, read_tensor(t, folder, deferred))

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> DataFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_tensor(t: TensorProto, folder: Path, deferred: Mapping[str, Any] | None = None) -> np.ndarray:
    """The array of an initializer, reading external data from `folder` (one tensor's bytes) or
    computing a deferred one (see DataFile.defer)."""
    if t.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(t)
    info = {e.key: e.value for e in t.external_data}
    location = info.get("location", "")
    if location == PLACEHOLDER:
        if deferred is None or t.name not in deferred:
            raise ValueError(f"initializer {t.name} is deferred and nothing here computes it")
        return np.asarray(deferred[t.name])
    if not location or os.path.isabs(location) or ".." in Path(location).parts:
        raise ValueError(f"initializer {t.name}: external data location {location!r} is not inside the folder")
    dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
    shape = tuple(t.dims)
    out = np.empty(shape, dtype=dtype)
    length = int(info.get("length", out.nbytes))
    if length != out.nbytes:
        raise ValueError(f"initializer {t.name}: {length} bytes of external data for shape {shape} {dtype}")
    with open(Path(folder) / location, "rb") as f:
        f.seek(int(info.get("offset", 0)))
        if f.readinto(out.reshape(-1).view(np.uint8).data) != out.nbytes:
            raise ValueError(f"initializer {t.name}: external data ends early in {location}")
    return out


def read_rows(t: TensorProto, folder: Path, deferred: Mapping[str, Any] | None, start: int, stop: int) -> np.ndarray:
    """Rows start:stop (axis 0) of an initializer, the same values as `read_tensor(...)[start:stop]`,
    reading only those rows where the storage allows it (external data, a deferred weight whose
    source reads rows); otherwise the tensor is read whole and sliced."""
    if t.data_location != TensorProto.EXTERNAL or not t.dims:
        return read_tensor(t, folder, deferred)[start:stop]
    info = {e.key: e.value for e in t.external_data}
    if info.get("location") == PLACEHOLDER:
        values = (deferred or {}).get(t.name)
        if values is not None and getattr(values, "row_slices", False):
            return values.materialize_rows(start, stop)
        return read_tensor(t, folder, deferred)[start:stop]
    location = info.get("location", "")
    if not location or os.path.isabs(location) or ".." in Path(location).parts:
        raise ValueError(f"initializer {t.name}: external data location {location!r} is not inside the folder")
    dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
    shape = tuple(t.dims)
    start, stop = max(0, min(start, shape[0])), max(0, min(stop, shape[0]))
    stop = max(start, stop)
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    if int(info.get("length", shape[0] * row_bytes)) != shape[0] * row_bytes:
        raise ValueError(f"initializer {t.name}: {info.get('length')} bytes of external data for shape {shape} {dtype}")
    out = np.empty((stop - start,) + shape[1:], dtype=dtype)
    with open(Path(folder) / location, "rb") as f:
        f.seek(int(info.get("offset", 0)) + start * row_bytes)
        if f.readinto(out.reshape(-1).view(np.uint8).data) != out.nbytes:
            raise ValueError(f"initializer {t.name}: external data ends early in {location}")
    return out


def save_streamed(model: onnx.ModelProto, graph_path: Path, data: DataFile, folder: Path | None = None,
                  deferred: Mapping[str, Any] | None = None,
                  progress: Callable[[int, int], None] | None = None) -> None:
    """Write `model` to `graph_path`: every initializer not yet in `data` (inline ones from later
    rewrites, or external ones in another file under `folder`) is appended to `data` first, so the
    protobuf written holds offsets only. Deferred initializers are computed from `deferred` (or, if
    they are `data`'s own, left deferred: a graph that only feeds the quantizer). Closes `data`.
    `progress(done, total)` after each initializer."""
    folder = Path(folder) if folder is not None else Path(graph_path).parent
    inits = model.graph.initializer
    for i in range(len(inits)):
        t = inits[i]
        if data.holds(t, folder):
            continue
        moved = data.move(t, folder, deferred)
        if moved is not t:
            inits[i].CopyFrom(moved)
        if progress is not None:
            progress(i + 1, len(inits))
    data.close()
    onnx.save_model(model, str(graph_path))


def tensor_nbytes(t: TensorProto) -> int:
    """Size of a tensor from its dims and type (works for external data too)."""
    count = int(np.prod(t.dims, dtype=np.int64)) if t.dims else 1
    return count * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
