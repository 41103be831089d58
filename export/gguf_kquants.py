"""Exact block forms of GGUF K-quants, so they reach MatMulNBits without a second rounding.

Q4_K: super-blocks of 256 = 8 sub-blocks of 32, each with a 6-bit scale and a
6-bit minimum: x = d * sc * q - dmin * m. Per 32 values that is scale * q + min,
the same shape as Q4_1 (4 bits, block 32, float zero point -min / scale).
Q6_K: super-blocks of 256 = 16 sub-blocks of 16 with an int8 scale:
x = d * sc * (q - 32), q in [0, 64): 8 bits, block 16, zero point 32.
Byte layouts (ggml's block_q4_K / block_q6_K):
    Q4_K: d f16 | dmin f16 | scales[12] (6-bit sc and m, packed) | qs[128] (4-bit)
    Q6_K: ql[128] (low 4 bits) | qh[64] (high 2 bits) | scales[16] int8 | d f16
"""

from __future__ import annotations

import numpy as np

QK_K = 256


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def q4_k(raw: np.ndarray, n: int, k: int):
    """(q uint8 (n, k), scales (n, k/32), zero points (n, k/32)) of Q4_K bytes (n, k/256, 144)."""
    b = raw.reshape(n, k // QK_K, 144)
    d, dmin = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]  # (n, super, 1)
    s = b[..., 4:16].astype(np.uint8)  # (n, super, 12)
    sc = np.empty(s.shape[:-1] + (8,), np.uint8)
    mn = np.empty_like(sc)
    sc[..., :4], mn[..., :4] = s[..., 0:4] & 63, s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    qs = b[..., 16:].reshape(n, k // QK_K, 4, 32)  # 4 chunks of 64 values: low nibbles, then high
    q = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, k)  # (n, super, 4, 2, 32) -> (n, k)
    scale = (d * sc.astype(np.float32)).reshape(n, k // 32)
    minimum = (-dmin * mn.astype(np.float32)).reshape(n, k // 32)
    return _with_minimum(q, scale, minimum, 32)


def q6_k(raw: np.ndarray, n: int, k: int):
    """(q uint8 (n, k), scales (n, k/16), zero points (n, k/16)) of Q6_K bytes (n, k/256, 210)."""
    b = raw.reshape(n, k // QK_K, 210)
    ql = b[..., :128].reshape(n, -1, 2, 64)  # two halves of 128 values
    qh = b[..., 128:192].reshape(n, -1, 2, 32)
    sc = b[..., 192:208].view(np.int8).astype(np.float32)  # (n, super, 16)
    d = _f16(b[..., 208:210])[..., None]
    lo = ql & 0x0F, ql >> 4  # (n, super, 2, 64) each
    parts = [
        lo[0][..., :32] | ((qh & 3) << 4),
        lo[0][..., 32:] | (((qh >> 2) & 3) << 4),
        lo[1][..., :32] | (((qh >> 4) & 3) << 4),
        lo[1][..., 32:] | (((qh >> 6) & 3) << 4),
    ]
    q = np.stack(parts, axis=3).reshape(n, k)  # per half: values 0-31, 32-63, 64-95, 96-127
    scale = (d * sc).reshape(n, k // 16)
    return q.astype(np.uint8), scale.astype(np.float32), np.full_like(scale, 32.0, dtype=np.float32)


def _with_minimum(q: np.ndarray, scale: np.ndarray, minimum: np.ndarray, block: int):
    """scale * q + min as (q, scale, zp) with x = (q - zp) * scale; a zero-scale block holds only min."""
    flat = scale == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        zp = np.where(flat, 0.0, -minimum / np.where(flat, 1.0, scale)).astype(np.float32)
    if flat.any():
        n, k = q.shape
        q = q.reshape(n, k // block, block).copy()
        q[flat] = 1
        q = q.reshape(n, k)
    return q.astype(np.uint8), np.where(flat, minimum, scale).astype(np.float32), zp
