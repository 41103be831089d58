"""A safe, validating GGUF reader, and the map from GGUF names to Hugging Face names.

GGUF files come from outside: every size, count and offset in the header is
checked against the file size before it is used, so a truncated or hostile file
gives a `ModelFileError` naming the file and the problem, never a crash or a
huge allocation. The file is memory-mapped; tensors are zero-copy views of it.

Layout (little-endian; https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):
    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv x (string key, u32 value type, value)
    n_tensors x (string name, u32 n_dims, u64 dims[n_dims], u32 ggml type, u64 offset)
    padding to `general.alignment` (default 32) | tensor data (offsets relative to here)
A string is a u64 byte length then UTF-8 bytes; an array is a u32 item type,
a u64 count, then the items.

`gguf.constants` gives the type enums and block sizes and `gguf.quants` the
dequantization; the parsing is ours (`gguf.GGUFReader` trusts its input).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, replace
from math import prod
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from edge_infer.export.gguf_limits import (TensorExtent, check_layout)
from edge_infer.contract.errors import ModelFileError
from edge_infer.quantize.nbits import QuantizedLinear

SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_NESTING = 4  # arrays of arrays deeper than this are refused (recursion bound)
_REDOWNLOAD = "the file is damaged or not a GGUF model: download or convert it again"

# GGUF metadata value types: id -> (name, struct format, numpy dtype); 8 is STRING, 9 ARRAY.
_SCALARS = {
    0: ("UINT8", "<B", "<u1"), 1: ("INT8", "<b", "<i1"), 2: ("UINT16", "<H", "<u2"),
    3: ("INT16", "<h", "<i2"), 4: ("UINT32", "<I", "<u4"), 5: ("INT32", "<i", "<i4"),
    6: ("FLOAT32", "<f", "<f4"), 7: ("BOOL", "<B", "<u1"), 10: ("UINT64", "<Q", "<u8"),
    11: ("INT64", "<q", "<i8"), 12: ("FLOAT64", "<d", "<f8"),
}
_STRING, _ARRAY = 8, 9
# Plain (non-block) tensor types gguf.quants does not convert; we cast them.
_PLAIN = {"I8": "<i1", "I16": "<i2", "I32": "<i4", "I64": "<i8", "F64": "<f8"}


def _fail(path: str, problem: str, advice: str = _REDOWNLOAD) -> ModelFileError:
    return ModelFileError(f"GGUF file {path}: {problem}; {advice}")


@dataclass(frozen=True, eq=False)
class GGUFTensor:
    """One tensor of a GGUF file. `shape` is numpy order (ggml dims reversed).

    `raw` is a zero-copy, read-only view of the tensor's bytes in the file. When
    `row_order` is set, `dequantize()` and `blocks()` return axis-0 entries in that
    order (`out[i] = file[row_order[i]]`); `raw` always stays the file's bytes.
    """

    name: str
    shape: tuple[int, ...]
    ggml_type: str
    raw: np.ndarray  # (nbytes,) uint8
    path: str = ""
    row_order: np.ndarray | None = None

    def with_row_order(self, order: np.ndarray) -> GGUFTensor:
        order = np.asarray(order)
        if sorted(order.tolist()) != list(range(self.shape[0])):
            raise ValueError(f"row order for '{self.name}' is not a permutation of its {self.shape[0]} rows")
        return replace(self, row_order=order)

    def dequantize(self) -> np.ndarray:
        qtype = GGMLQuantizationType[self.ggml_type]
        if self.ggml_type in _PLAIN:
            out = self.raw.view(_PLAIN[self.ggml_type]).astype(np.float32)
        else:
            block, type_size = GGML_QUANT_SIZES[qtype]
            rows = self.raw.reshape(-1, self.shape[-1] // block * type_size)  # (rows, bytes per row)
            try:
                out = np.array(gguf_dequantize(rows, qtype), dtype=np.float32)  # copy: never a file view
            except NotImplementedError:
                raise _fail(self.path, f"tensor '{self.name}' has type {self.ggml_type}, which this reader "
                            "cannot dequantize", "convert the model to Q4_0, Q4_1, Q8_0, F16 or F32") from None
        out = out.reshape(self.shape)
        return out if self.row_order is None else out[self.row_order]

    def dequantize_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows start:stop of `dequantize()` (axis 0 of a 2-D tensor, after `row_order`), reading only
        their blocks: the same values, without the whole tensor in float (a vocabulary-sized
        embedding is 0.9 GB in fp32 at 1.5B). Rows are independent in every ggml type."""
        if len(self.shape) != 2:
            return self.dequantize()[start:stop]
        n, k = self.shape
        if self.ggml_type in _PLAIN:
            rows = self.raw.view(_PLAIN[self.ggml_type]).reshape(n, k)
            return (rows[start:stop] if self.row_order is None else rows[self.row_order[start:stop]]).astype(np.float32)
        qtype = GGMLQuantizationType[self.ggml_type]
        block, type_size = GGML_QUANT_SIZES[qtype]
        rows = self.raw.reshape(n, k // block * type_size)
        rows = rows[start:stop] if self.row_order is None else rows[self.row_order[start:stop]]
        try:
            out = np.array(gguf_dequantize(rows, qtype), dtype=np.float32)
        except NotImplementedError:
            raise _fail(self.path, f"tensor '{self.name}' has type {self.ggml_type}, which this reader "
                        "cannot dequantize", "convert the model to Q4_0, Q4_1, Q8_0, F16 or F32") from None
        return out.reshape(-1, k)

    def blocks(self) -> QuantizedLinear | None:
        """The exact blockwise form of a 2-D Q4_0, Q4_1, Q8_0 tensor or of a type in
        gguf_kquants.EXACT (Q2_K to Q6_K, Q5_0, Q5_1); None for other tensors.

        The blocks are MatMulNBits weights in numpy order (out_features, in_features) with float32
        zero points: element (n, k) is `(q[n, k] - zero_points[n, k // block_size]) * scales[n, k // block_size]`.
        The export turns integer zero points into uint8 and splits the rest (quantize.block_offsets)."""
        from edge_infer.export.gguf_kquants import EXACT

        if len(self.shape) != 2 or self.ggml_type not in ("Q4_0", "Q4_1", "Q8_0", *EXACT):
            return None
        n, k = self.shape
        if self.ggml_type in EXACT:
            decode, bits, block = EXACT[self.ggml_type]
            q, scales, zps = decode(self.raw, n, k)
            out = QuantizedLinear(bits, block, q, scales, zps, k)
            return out if self.row_order is None else out.take_rows(self.row_order)
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[self.ggml_type]]
        b = self.raw.reshape(n, k // block, type_size)  # (N, blocks, bytes per block)

        def half(lo: int) -> np.ndarray:  # an f16 field of every block -> (N, blocks) float32
            return np.ascontiguousarray(b[..., lo:lo + 2]).view(np.float16)[..., 0].astype(np.float32)

        def nibbles(qs: np.ndarray) -> np.ndarray:  # (N, blocks, 16) -> (N, K): low nibbles first
            return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(n, k)

        d = half(0)
        if self.ggml_type == "Q4_0":  # x = d * (q - 8)
            out = QuantizedLinear(4, block, nibbles(b[..., 2:]), d, np.full_like(d, 8.0), k)
        elif self.ggml_type == "Q8_0":  # x = d * int8; q = int8 + 128 (flip the sign bit)
            out = QuantizedLinear(8, block, (b[..., 2:] ^ 0x80).reshape(n, k), d, np.full_like(d, 128.0), k)
        else:  # Q4_1: x = d * q + m = d * (q - (-m / d))
            m = half(2)
            q = nibbles(b[..., 4:])
            flat = d == 0  # every value of such a block is m: encode it as q = 1, zp = 0, scale = m
            with np.errstate(divide="ignore", invalid="ignore"):
                zp = np.where(flat, 0.0, -m / np.where(flat, 1.0, d)).astype(np.float32)
            if flat.any():
                q = q.reshape(n, k // block, block)
                q[flat] = 1
                q = q.reshape(n, k)
            out = QuantizedLinear(4, block, q, np.where(flat, m, d).astype(np.float32), zp, k)
        return out if self.row_order is None else out.take_rows(self.row_order)


@dataclass(frozen=True, eq=False)
class GGUFFile:
    path: str
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]
    alignment: int = DEFAULT_ALIGNMENT


class _Cursor:
    """Reads header fields, checking each against the end of the file first."""

    def __init__(self, path: str, buf: memoryview):
        self.path, self.buf, self.size, self.pos = path, buf, len(buf), 0

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise _fail(self.path, f"truncated: {what} needs {n} bytes at offset {self.pos}, "
                        f"but the file ends at {self.size}")

    def unpack(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str) -> str:
        n = self.unpack("<Q", f"the length of {what}")
        self.need(n, f"{what} ({n} bytes)")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _fail(self.path, f"{what} at offset {self.pos - n} is not valid UTF-8") from None

    def count(self, what: str, min_item_size: int) -> int:
        """A u64 count of items that must fit in the bytes left (no huge allocations)."""
        n = self.unpack("<Q", f"the count of {what}")
        left = self.size - self.pos
        if n * min_item_size > left:
            raise _fail(self.path, f"{what}: count {n} cannot fit in the {left} bytes left "
                        f"(each item takes at least {min_item_size} bytes)")
        return n

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            v = self.unpack(_SCALARS[vtype][1], what)
            return bool(v) if vtype == 7 else v
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY:
            raise _fail(self.path, f"{what} has unknown value type {vtype}")
        if depth >= MAX_NESTING:
            raise _fail(self.path, f"{what}: arrays nested deeper than {MAX_NESTING} levels")
        itype = self.unpack("<I", f"the item type of {what}")
        if itype in _SCALARS:
            dtype = np.dtype(_SCALARS[itype][2])
            n = self.count(f"{what} ({_SCALARS[itype][0]} array)", dtype.itemsize)
            arr = np.frombuffer(self.buf, dtype, count=n, offset=self.pos)
            self.pos += n * dtype.itemsize
            return [bool(x) for x in arr] if itype == 7 else arr.tolist()
        if itype == _STRING:
            n = self.count(f"{what} (string array)", 8)
            return [self.string(f"item {i} of {what}") for i in range(n)]
        if itype == _ARRAY:
            n = self.count(f"{what} (array of arrays)", 12)
            return [self.value(_ARRAY, f"item {i} of {what}", depth + 1) for i in range(n)]
        raise _fail(self.path, f"{what} is an array of unknown value type {itype}")


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse and validate a GGUF file; tensors stay in the file (memory-mapped)."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise ModelFileError(f"GGUF file {path}: cannot read it ({e.strerror}); check the path") from None
    if size < 24:
        raise _fail(path, f"only {size} bytes, too short for a GGUF header (24 bytes)")
    mm = np.memmap(path, dtype=np.uint8, mode="r")  # (size,) read-only
    cur = _Cursor(path, mm.data)

    magic = bytes(cur.buf[0:4])
    if magic != b"GGUF":
        raise _fail(path, f"bad magic {magic!r} (expected b'GGUF')", "this is not a GGUF file")
    cur.pos = 4
    version = cur.unpack("<I", "the version")
    if version not in SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0 and (version >> 24) in SUPPORTED_VERSIONS:
            raise _fail(path, "big-endian GGUF is not supported", "use a little-endian GGUF file")
        raise _fail(path, f"unsupported GGUF version {version} (supported: 2, 3)",
                    "convert the model again with a current llama.cpp")
    n_tensors = cur.unpack("<Q", "the tensor count")
    n_kv = cur.unpack("<Q", "the metadata count")
    # Cheapest possible entries: kv = key length + type + 1-byte value; tensor info = 24 bytes.
    if n_kv * 13 + n_tensors * 24 > size - cur.pos:
        raise _fail(path, f"header claims {n_tensors} tensors and {n_kv} metadata entries, "
                    f"which cannot fit in a {size}-byte file")

    metadata, alignment = _metadata(cur, n_kv)
    infos = []  # (name, numpy shape, type name, offset, nbytes)
    names: set[str] = set()
    for i in range(n_tensors):
        infos.append(_tensor_info(cur, i, alignment, names))

    data_start = -(-cur.pos // alignment) * alignment
    tensors: dict[str, GGUFTensor] = {}
    prev_end, prev_name = 0, ""
    for name, shape, tname, offset, nbytes in sorted(infos, key=lambda t: t[3]):
        start = data_start + offset
        if start + nbytes > size:
            raise _fail(path, f"tensor '{name}' ({nbytes} bytes at offset {start}) runs past the end "
                        f"of the file ({size} bytes); the file is truncated")
        if offset < prev_end:
            raise _fail(path, f"tensors '{prev_name}' and '{name}' overlap in the data section")
        prev_end, prev_name = offset + nbytes, name
        tensors[name] = GGUFTensor(name, shape, tname, mm[start:start + nbytes], path)
    check_layout(path, [TensorExtent(i[0], i[2], i[3], i[4]) for i in infos], data_start, size, alignment)
    tensors = {info[0]: tensors[info[0]] for info in infos}  # keep the file's order
    return GGUFFile(path, version, metadata, tensors, alignment)


def _metadata(cur: _Cursor, n_kv: int) -> tuple[dict[str, Any], int]:
    """The header's key/value metadata and the data alignment it sets."""
    path = cur.path
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key {i}")
        if key in metadata:
            raise _fail(path, f"duplicate metadata key '{key}'")
        vtype = cur.unpack("<I", f"the value type of metadata key '{key}'")
        metadata[key] = cur.value(vtype, f"metadata key '{key}'")

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1) or alignment > 1 << 20:
        raise _fail(path, f"general.alignment is {alignment!r}; it must be a power of two")
    return metadata, alignment


def _tensor_info(cur: _Cursor, i: int, alignment: int, names: set[str]) -> tuple[str, tuple[int, ...], str, int, int]:
    """Tensor i's entry in the header: (name, numpy shape, type name, data offset, nbytes); `names`
    holds the names read so far (a repeat is refused)."""
    path = cur.path
    name = cur.string(f"the name of tensor {i}")
    if name in names:
        raise _fail(path, f"duplicate tensor name '{name}'")
    names.add(name)
    n_dims = cur.unpack("<I", f"the dimension count of tensor '{name}'")
    if not 1 <= n_dims <= 4:
        raise _fail(path, f"tensor '{name}' has {n_dims} dimensions (1 to 4 are allowed)")
    dims = [cur.unpack("<Q", f"dimension {d} of tensor '{name}'") for d in range(n_dims)]
    if any(d == 0 or d >= 1 << 63 for d in dims):  # ggml stores int64: >= 2**63 is negative
        raise _fail(path, f"tensor '{name}' has a zero or negative dimension: {dims}")
    code = cur.unpack("<I", f"the type of tensor '{name}'")
    try:
        qtype = GGMLQuantizationType(code)
        block, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise _fail(path, f"tensor '{name}' has unknown ggml type {code}",
                    "convert the model again with a current llama.cpp") from None
    if dims[0] % block:
        raise _fail(path, f"tensor '{name}' ({qtype.name}) has {dims[0]} elements per row, "
                    f"not a multiple of the block size {block}")
    offset = cur.unpack("<Q", f"the data offset of tensor '{name}'")
    if offset % alignment:
        raise _fail(path, f"tensor '{name}' data offset {offset} is not a multiple of the "
                    f"alignment {alignment}")
    nbytes = prod(dims) // block * type_size
    return name, tuple(reversed(dims)), qtype.name, offset, nbytes


# ---------------------------------------------------------------- GGUF -> Hugging Face names

def unpermute_rows(rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama.cpp's rotary permutation of attn_q / attn_k.

    llama.cpp's converter stores each head's rows interleaved as (half, 2);
    Hugging Face keeps them as (2, half). `hf = gguf[order]`; transformers'
    GGUF loader applies the same reverse permutation.
    """
    half = rows // n_head // 2
    return np.arange(rows).reshape(n_head, half, 2).swapaxes(1, 2).reshape(rows)  # (rows,)


def gguf_to_hf(g: GGUFFile):
    """(transformers-style config, HF weight name -> lazily read tensor, tokenizer metadata);
    the per-family mapping lives in export/gguf_arch.py."""
    from edge_infer.export.gguf_arch import gguf_to_hf as to_hf

    return to_hf(g)
