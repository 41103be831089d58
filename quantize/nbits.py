"""Weight-only block quantization for onnxruntime's `com.microsoft.MatMulNBits`.

A linear layer y = x @ W.T with W of shape (N, K) (N = out_features,
K = in_features) is stored as unsigned integers q in [0, 2**bits), one scale
and one zero point per block of `block_size` consecutive K elements:

    W[n, k] ~= (q[n, k] - zero_point[n, k // block_size]) * scale[n, k // block_size]

This is exactly what MatMulNBits computes, so a `QuantizedLinear` maps onto
its inputs without a second rounding. K is padded up to a whole number of
blocks; the padding columns quantize to exact zeros and are sliced off again
by `dequantize`.

Symmetric mapping (`quantize_rtn(..., symmetric=True)`)
-------------------------------------------------------
The zero point is the implied 2**(bits-1) (8 for 4 bits), so the signed
levels are -8..7 for 4 bits (-128..127 for 8). The range is not symmetric,
so per block we pick which sign of weights goes on the longer (-8) side:

    scale = min over the two orientations of max(M_long / 8, M_short / 7.5)

where M_long / M_short are the largest magnitudes on each side (for 4 bits;
128 / 127.5 for 8). The scale is therefore negative when the positive weights
take the -8 side, as in llama.cpp's Q4_0. This uses all 16 levels when one
side dominates (step = absmax / 8) and still guarantees
|W - dequantized| <= |scale| / 2 for every element: the short side reaches
at most 7.5 steps, which rounds to 7 with an error of half a step.

Asymmetric mapping (the default)
--------------------------------
The block range [min(w_min, 0), max(w_max, 0)] spans 2**bits - 1 steps and
the uint8 zero point is round(-min / scale). Including 0 in the range keeps
the zero point an integer in [0, 2**bits) and makes zero exactly
representable. Error <= scale / 2 per element.

All-zero blocks get scale 0 and dequantize to exact zeros.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import helper, numpy_helper

SUPPORTED_BITS = (4, 8)
MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True, eq=False)
class QuantizedLinear:
    """A block-quantized (N, K) weight, laid out the way MatMulNBits reads it.

    q:            uint8 (N, K_padded), one unpacked value in [0, 2**bits) each
    scales:       float32 (N, n_blocks)
    zero_points:  uint8 (N, n_blocks) integers in [0, 2**bits), or
                  float32 (N, n_blocks) (e.g. GGUF Q4_1: zp = -min / d), or
                  None: implied 2**(bits-1)
    k:            the true in_features K; K_padded = n_blocks * block_size >= K
    """

    bits: int
    block_size: int
    q: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    k: int

    def __post_init__(self) -> None:
        # These come from our own code (quantize_rtn, the GGUF importer): a bad
        # layout is a programming error, not a user mistake.
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        bs = self.block_size
        if not (16 <= bs <= 256 and bs & (bs - 1) == 0):
            raise ValueError(f"block_size must be a power of two in 16..256, got {bs}")
        if self.q.dtype != np.uint8 or self.q.ndim != 2:
            raise ValueError(f"q must be a uint8 (N, K_padded) array, got {self.q.dtype} {self.q.shape}")
        n, k_padded = self.q.shape
        if k_padded % bs != 0:
            raise ValueError(f"q has {k_padded} columns, not a multiple of block_size {bs}")
        n_blocks = k_padded // bs
        if not (k_padded - bs < self.k <= k_padded):
            raise ValueError(f"k={self.k} does not fit {n_blocks} blocks of {bs}")
        if self.scales.dtype != np.float32 or self.scales.shape != (n, n_blocks):
            raise ValueError(
                f"scales must be float32 {(n, n_blocks)}, got {self.scales.dtype} {self.scales.shape}"
            )
        zp = self.zero_points
        if zp is not None:
            if zp.shape != (n, n_blocks) or zp.dtype not in (np.uint8, np.float32):
                raise ValueError(
                    f"zero_points must be uint8 or float32 {(n, n_blocks)}, got {zp.dtype} {zp.shape}"
                )
            if zp.dtype == np.uint8 and int(zp.max(initial=0)) >= 1 << self.bits:
                raise ValueError(f"uint8 zero points must be < {1 << self.bits}")
        if int(self.q.max(initial=0)) >= 1 << self.bits:
            raise ValueError(f"q values must be < {1 << self.bits} for {self.bits} bits")

    @property
    def n(self) -> int:
        return int(self.q.shape[0])

    @property
    def k_padded(self) -> int:
        return int(self.q.shape[1])

    @property
    def n_blocks(self) -> int:
        return self.k_padded // self.block_size

    @property
    def blob_size(self) -> int:
        """Bytes per block in the packed B input."""
        return self.block_size * self.bits // 8

    def dequantize(self) -> np.ndarray:
        return dequantize(self)

    def take_rows(self, order: np.ndarray) -> QuantizedLinear:
        """Reorder output features (rows); blocks run along in_features, so they stay exact."""
        zp = None if self.zero_points is None else self.zero_points[order]
        return replace(self, q=self.q[order], scales=self.scales[order], zero_points=zp)


def _blocks(w: np.ndarray, block_size: int) -> tuple[np.ndarray, int]:
    """Zero-pad w (N, K) to whole blocks; returns ((N, n_blocks, block_size) float32, K)."""
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D (N, K) weight, got shape {w.shape}")
    n, k = w.shape
    n_blocks = -(-k // block_size)
    padded = np.zeros((n, n_blocks * block_size), dtype=np.float32)
    padded[:, :k] = w
    return padded.reshape(n, n_blocks, block_size), k


def _safe_divide(w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """w / scale per block, with scale 0 (all-zero blocks) giving 0."""
    denom = np.where(scale == 0, 1.0, scale).astype(np.float32)
    return w / denom[..., None]


def quantize_rtn(
    w: np.ndarray, bits: int = 4, block_size: int = 32, symmetric: bool = False
) -> QuantizedLinear:
    """Round-to-nearest block quantization of w (N, K); see the module docstring for the mappings."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    blocks, k = _blocks(np.asarray(w, dtype=np.float32), block_size)  # (N, n_blocks, block_size)
    qmax = (1 << bits) - 1
    half = 1 << (bits - 1)  # 8 for 4 bits

    if symmetric:
        pos = np.maximum(blocks.max(axis=-1), 0.0)  # (N, n_blocks) largest positive magnitude
        neg = np.maximum(-blocks.min(axis=-1), 0.0)  # (N, n_blocks) largest negative magnitude
        # Orientation A: negatives on the long side (levels -half..), scale > 0.
        # Orientation B: positives on the long side, scale < 0.
        step_a = np.maximum(neg / half, pos / (half - 0.5))
        step_b = np.maximum(pos / half, neg / (half - 0.5))
        scales = np.where(step_a <= step_b, step_a, -step_b).astype(np.float32)
        levels = np.rint(_safe_divide(blocks, scales))
        q = np.clip(levels, -half, half - 1) + half
        zero_points = None
    else:
        lo = np.minimum(blocks.min(axis=-1), 0.0)  # (N, n_blocks)
        hi = np.maximum(blocks.max(axis=-1), 0.0)
        scales = ((hi - lo) / qmax).astype(np.float32)
        zp = np.clip(np.rint(-_safe_divide(lo[..., None], scales)[..., 0]), 0, qmax)
        levels = np.rint(_safe_divide(blocks, scales)) + zp[..., None]
        q = np.clip(levels, 0, qmax)
        zero_points = zp.astype(np.uint8)

    n = blocks.shape[0]
    return QuantizedLinear(
        bits=bits,
        block_size=block_size,
        q=q.astype(np.uint8).reshape(n, -1),
        scales=scales,
        zero_points=zero_points,
        k=k,
    )


def dequantize(ql: QuantizedLinear) -> np.ndarray:
    """The float32 (N, K) weight that MatMulNBits multiplies by: (q - zp) * scale."""
    n, nb, bs = ql.n, ql.n_blocks, ql.block_size
    q = ql.q.reshape(n, nb, bs).astype(np.float32)  # (N, n_blocks, block_size)
    if ql.zero_points is None:
        zp = np.full((n, nb), 1 << (ql.bits - 1), dtype=np.float32)
    else:
        zp = ql.zero_points.astype(np.float32)  # (N, n_blocks)
    w = (q - zp[..., None]) * ql.scales[..., None]
    return w.reshape(n, nb * bs)[:, : ql.k]


def quantize_absmax(w: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Signed round-to-nearest blocks of w (N, K) with zero point 0, the mapping of DequantizeLinear's
    int8 blocks (the npu profile): q int8 (N, K) in [-2**(bits-1), 2**(bits-1) - 1] and scales float32
    (N, n_blocks), each its block's largest magnitude / (2**(bits-1) - 1); w ~= q * scale. K must be
    a whole number of blocks."""
    blocks, k = _blocks(np.asarray(w, dtype=np.float32), block_size)  # (N, n_blocks, block_size)
    if k % block_size:
        raise ValueError(f"K={k} is not a whole number of blocks of {block_size}")
    top = (1 << (bits - 1)) - 1  # 7 or 127
    scales = (np.abs(blocks).max(axis=-1) / top).astype(np.float32)  # (N, n_blocks)
    q = np.clip(np.rint(_safe_divide(blocks, scales)), -top - 1, top).astype(np.int8)
    return q.reshape(blocks.shape[0], k), scales


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned values along the last axis: 4 bits puts element 2i in the low nibble."""
    values = values.astype(np.uint8)
    if bits == 8:
        return values
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros(values.shape[:-1] + (1,), np.uint8)], axis=-1)
    pairs = values.reshape(values.shape[:-1] + (-1, 2))
    return (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of pack_bits, keeping the first `count` values of the last axis."""
    if bits == 8:
        return packed[..., :count]
    lo, hi = packed & 0x0F, packed >> 4
    return np.stack([lo, hi], axis=-1).reshape(packed.shape[:-1] + (-1,))[..., :count]


def packed_b(ql: QuantizedLinear) -> np.ndarray:
    """MatMulNBits input B: uint8 (N, n_blocks, blob_size)."""
    q = ql.q.reshape(ql.n, ql.n_blocks, ql.block_size)
    return pack_bits(q, ql.bits)


def packed_zero_points(ql: QuantizedLinear) -> np.ndarray | None:
    """MatMulNBits zero_points: uint8 (N, ceil(n_blocks * bits / 8)), float (N, n_blocks), or None."""
    if ql.zero_points is None:
        return None
    if ql.zero_points.dtype == np.uint8:
        return pack_bits(ql.zero_points, ql.bits)
    return ql.zero_points


@dataclass(frozen=True)
class NBitsNames:
    """Initializer names of one quantized weight, derived from a prefix (the float weight's name)."""

    b: str  # prefix + "_Q4" / "_Q8"
    scales: str  # prefix + "_scales"
    zero_points: str  # prefix + "_zp"

    @classmethod
    def for_prefix(cls, prefix: str, bits: int) -> NBitsNames:
        return cls(b=f"{prefix}_Q{bits}", scales=f"{prefix}_scales", zero_points=f"{prefix}_zp")


def nbits_initializers(
    ql: QuantizedLinear, prefix: str, dtype: type[np.floating] = np.float32
) -> tuple[NBitsNames, list[onnx.TensorProto]]:
    """The B, scales and (optional) zero_points initializers of one weight.

    dtype is the float type of the graph's activations: MatMulNBits wants scales
    (and float zero points) of the same type as its input A.
    """
    names = NBitsNames.for_prefix(prefix, ql.bits)
    tensors = [
        numpy_helper.from_array(packed_b(ql), names.b),  # (N, n_blocks, blob_size)
        numpy_helper.from_array(ql.scales.astype(dtype), names.scales),  # (N, n_blocks)
    ]
    zp = packed_zero_points(ql)
    if zp is not None:
        if zp.dtype != np.uint8:
            zp = zp.astype(dtype)  # (N, n_blocks)
        tensors.append(numpy_helper.from_array(zp, names.zero_points))
    return names, tensors


def matmul_nbits(
    x_name: str,
    out_name: str,
    node_name: str,
    ql: QuantizedLinear,
    accuracy_level: int = 4,
    *,
    prefix: str,
    dtype: type[np.floating] = np.float32,
    b_names: NBitsNames | None = None,
) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """A MatMulNBits node computing out = x @ dequantize(ql).T, and its initializers.

    x: (..., K) of `dtype`; out: (..., N). Initializers are named
    prefix + "_Q{bits}", "_scales", "_zp". Pass `b_names` to reuse initializers
    that already exist (a tied embedding): then no initializers are returned.
    """
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ValueError(f"accuracy_level must be 0..4, got {accuracy_level}")
    if b_names is None:
        names, tensors = nbits_initializers(ql, prefix, dtype)
    else:
        names, tensors = b_names, []
    inputs = [x_name, names.b, names.scales]
    if ql.zero_points is not None:
        inputs.append(names.zero_points)
    node = helper.make_node(
        "MatMulNBits",
        inputs,
        [out_name],
        name=node_name,
        domain=MS_DOMAIN,
        K=ql.k,
        N=ql.n,
        bits=ql.bits,
        block_size=ql.block_size,
        accuracy_level=accuracy_level,
    )
    return node, tensors


def split_blocks(ql: QuantizedLinear, block_size: int) -> QuantizedLinear:
    """The same weights in smaller blocks (each scale and zero point repeated): exact.

    Smaller blocks give MatMulNBits' int8-activation path (accuracy_level 4)
    finer activation scales, so imported GGUF blocks of 32 can run at 16.
    """
    if block_size == ql.block_size:
        return ql
    if ql.block_size % block_size:
        raise ValueError(f"cannot split blocks of {ql.block_size} into blocks of {block_size}")
    f = ql.block_size // block_size
    zp = None if ql.zero_points is None else np.repeat(ql.zero_points, f, axis=1)
    return QuantizedLinear(bits=ql.bits, block_size=block_size, q=ql.q, scales=np.repeat(ql.scales, f, axis=1),
                           zero_points=zp, k=ql.k)
