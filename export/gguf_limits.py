"""Sane ranges for what a GGUF header claims, checked before anything is sized from it.

A GGUF file is hostile input: one header integer (`llama.block_count` set to
2**31 - 1) must not become a per-layer list of two billion names, and one
context length of 0 or 3 must not become a model folder. `check_geometry` runs
before any list, array or graph is built from the metadata, and compares the
counts with what the file actually holds (each layer needs its tensors).

`check_layout` holds the tensor table to the way every real writer lays data
out (llama.cpp, gguf-py): tensors back to back in offset order, each starting at
the aligned end of the one before, the last ending at the end of the file (only
alignment padding after it). A changed type id or shape changes a tensor's byte
size, so it no longer fits its gap and is refused instead of read as other bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edge_infer.contract.errors import ModelFileError

# Upper bounds far above any released model, far below anything that exhausts memory when sized from.
MAX_LAYERS = 1024
MAX_HIDDEN = 1 << 17  # 131072
MAX_HEADS = 1 << 12
MAX_HEAD_DIM = 1 << 12
MAX_FFN = 1 << 20
MAX_VOCAB = 1 << 22  # 4M tokens
MIN_CONTEXT = 16  # below this a chat template alone does not fit
MAX_CONTEXT = 1 << 24  # 16M positions
TENSORS_PER_LAYER = 6  # the leanest family (phi3: attn_norm, fused qkv, output, ffn_norm, fused gate+up, down)
_ADVICE = "the file is damaged or not a model this reader supports: download or convert it again"


@dataclass(frozen=True)
class TensorExtent:
    """Where one tensor's bytes lie, relative to the start of the data section."""

    name: str
    type_name: str
    offset: int
    nbytes: int


def _fail(path: str, problem: str, advice: str = _ADVICE) -> ModelFileError:
    return ModelFileError(f"GGUF file {path}: {problem}; {advice}")


def check_layout(path: str, extents: list[TensorExtent], data_start: int, file_size: int, alignment: int) -> None:
    """Tensors packed back to back in offset order, the data ending at the end of the file."""
    expected, prev = 0, None
    for e in sorted(extents, key=lambda x: x.offset):
        if e.offset != expected:
            after = f"after '{prev.name}' ends at {prev.offset + prev.nbytes}" if prev else "at the data start"
            raise _fail(path, f"tensor '{e.name}' ({e.type_name}, {e.nbytes} bytes) starts at data offset "
                        f"{e.offset}, but the next tensor must start at {expected} ({after}, aligned to "
                        f"{alignment}): its type, shape or offset was changed")
        expected = -(-(e.offset + e.nbytes) // alignment) * alignment
        prev = e
    if prev is None:
        return
    end = data_start + prev.offset + prev.nbytes
    if not 0 <= file_size - end < alignment:
        raise _fail(path, f"the tensor data ends at byte {end} but the file has {file_size} bytes "
                    f"({file_size - end} bytes unaccounted for): the last tensor's type, shape or offset was "
                    "changed, or bytes were appended")


@dataclass(frozen=True)
class GeometryClaims:
    """What the metadata says about the model's shape (numbers only, before any use)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    context: int
    rms_eps: float
    rope_theta: float


def check_geometry(path: str, arch: str, c: GeometryClaims, n_tensors: int, block_ids: set[int]) -> None:
    """Every geometry value in range and consistent, and the layer count backed by tensors in the file."""
    ranges = {  # key suffix -> (value, lowest, highest)
        "block_count": (c.layers, 1, MAX_LAYERS), "embedding_length": (c.hidden, 1, MAX_HIDDEN),
        "attention.head_count": (c.heads, 1, MAX_HEADS), "attention.head_count_kv": (c.kv_heads, 1, MAX_HEADS),
        "attention.key_length": (c.head_dim, 1, MAX_HEAD_DIM), "feed_forward_length": (c.ffn, 1, MAX_FFN),
        "vocab_size": (c.vocab, 1, MAX_VOCAB), "context_length": (c.context, MIN_CONTEXT, MAX_CONTEXT),
    }
    for key, (value, low, high) in ranges.items():
        if not low <= value <= high:
            raise _fail(path, f"{arch}.{key} is {value}, outside the sane range {low}..{high}")
    if c.heads % c.kv_heads:
        raise _fail(path, f"{arch}.attention.head_count {c.heads} is not a multiple of head_count_kv {c.kv_heads}")
    if c.head_dim % 2:
        raise _fail(path, f"head size {c.head_dim} is odd; rotary embeddings need an even head size")
    if not (math.isfinite(c.rms_eps) and 0 < c.rms_eps < 1):
        raise _fail(path, f"{arch}.attention.layer_norm_rms_epsilon is {c.rms_eps}, expected a small positive number")
    if not (math.isfinite(c.rope_theta) and c.rope_theta > 0):
        raise _fail(path, f"{arch}.rope.freq_base is {c.rope_theta}, expected a positive number")
    # The layer count is checked against the tensors before any per-layer list is built from it.
    if c.layers * TENSORS_PER_LAYER > n_tensors:
        raise _fail(path, f"{arch}.block_count is {c.layers}, but the file holds only {n_tensors} tensors "
                    f"(each layer needs at least {TENSORS_PER_LAYER})")
    beyond = sorted(i for i in block_ids if i >= c.layers)
    if beyond:
        raise _fail(path, f"tensors of block {beyond[0]} exist but {arch}.block_count is {c.layers}")


def block_ids(names: list[str] | set[str] | dict) -> set[int]:
    """The N of every `blk.N.*` tensor name; a non-ASCII or absurdly long N counts as past every limit
    (int() would fail on '²' or on 5,000 digits)."""
    out = set()
    for name in names:
        parts = name.split(".")
        if len(parts) > 2 and parts[0] == "blk" and parts[1].isdigit():
            n = parts[1]
            out.add(int(n) if n.isascii() and len(n) <= 7 else MAX_LAYERS * 1000)
    return out


INTEGER_TYPES = ("I8", "I16", "I32", "I64")


def check_weight_types(path: str, types: dict[str, str]) -> None:
    """A language model's weights are floats or quantized blocks, never integer tensors: an integer type
    of the same byte size as the real one (F32 -> I32) is the one type change the layout cannot show."""
    bad = [f"{name} ({t})" for name, t in types.items() if t in INTEGER_TYPES]
    if bad:
        raise _fail(path, f"weights stored as integers: {', '.join(bad[:4])}; no supported model has them")
