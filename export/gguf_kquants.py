"""Exact block forms of GGUF K-quants and 5-bit types, so they reach MatMulNBits without a second rounding.

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
    sc, mn = _scale_min_k4(b[..., 4:16])  # (n, super, 8) each
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


# ---------------------------------------------------------------- 5-, 3- and 2-bit types, imported as 8-bit blocks
# MatMulNBits takes 4 or 8 bits; these values fit 8 bits exactly (Q6_K likewise stays 8-bit).
# Byte layouts (ggml's block_q5_0, block_q5_1, block_q5_K, block_q3_K, block_q2_K):
#     Q5_0: d f16 | qh[4] (5th bits, little-endian u32) | qs[16] (low nibbles: values 0-15, high: 16-31)
#     Q5_1: d f16 | m f16 | qh[4] | qs[16]                       x = d * q + m
#     Q5_K: d f16 | dmin f16 | scales[12] (as Q4_K) | qh[32] | qs[128]   x = d * sc * q - dmin * m
#     Q3_K: hmask[32] | qs[64] (2-bit) | scales[12] (6-bit, offset 32) | d f16
#     Q2_K: scales[16] (4-bit sc low, 4-bit m high) | qs[64] (2-bit) | d f16 | dmin f16


def _q5_values(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """(..., 32) 5-bit values of Q5_0 / Q5_1 blocks from qh (..., 4) and qs (..., 16)."""
    bits = np.unpackbits(qh, axis=-1, bitorder="little")  # (..., 32): bit j is value j's 5th bit
    low = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # (..., 32)
    return (low | (bits << 4)).astype(np.uint8)


def q5_0(raw: np.ndarray, n: int, k: int):
    b = raw.reshape(n, k // 32, 22)
    q = _q5_values(b[..., 2:6], b[..., 6:]).reshape(n, k)
    d = _f16(b[..., 0:2])
    return q, d, np.full_like(d, 16.0)


def q5_1(raw: np.ndarray, n: int, k: int):
    b = raw.reshape(n, k // 32, 24)
    q = _q5_values(b[..., 4:8], b[..., 8:]).reshape(n, k)
    return _with_minimum(q, _f16(b[..., 0:2]), _f16(b[..., 2:4]), 32)


def _scale_min_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and minimums packed in 12 bytes (Q4_K, Q5_K): (..., 12) -> 2 x (..., 8)."""
    sc = np.empty(s.shape[:-1] + (8,), np.uint8)
    mn = np.empty_like(sc)
    sc[..., :4], mn[..., :4] = s[..., 0:4] & 63, s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc, mn


def q5_k(raw: np.ndarray, n: int, k: int):
    b = raw.reshape(n, k // QK_K, 176)
    d, dmin = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]  # (n, super, 1)
    sc, mn = _scale_min_k4(b[..., 4:16])
    qh = b[..., 16:48]  # (n, super, 32): bit j of byte i is the 5th bit of value 32 j + i
    qs = b[..., 48:].reshape(n, k // QK_K, 4, 32)  # 4 chunks of 64 values: low nibbles, then high
    low = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, k // QK_K, 8, 32)
    high = (qh[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # (n, super, 8, 32)
    q = (low | (high << 4)).reshape(n, k)
    scale = (d * sc.astype(np.float32)).reshape(n, k // 32)
    minimum = (-dmin * mn.astype(np.float32)).reshape(n, k // 32)
    return _with_minimum(q, scale, minimum, 32)


def q3_k(raw: np.ndarray, n: int, k: int):
    """x = d * (sc - 32) * (q - 4), q = low 2 bits + 4 * hmask bit in [0, 8): 8-bit blocks of 16, zero point 4."""
    b = raw.reshape(n, k // QK_K, 110)
    hmask, qs, s = b[..., :32], b[..., 32:96], b[..., 96:108]
    d = _f16(b[..., 108:110])[..., None]
    low = (s[..., :8, None] >> np.array([0, 4], np.uint8)).swapaxes(-1, -2).reshape(n, -1, 16) & 0x0F
    high = (s[..., 8:12, None] >> np.array([0, 2, 4, 6], np.uint8)).swapaxes(-1, -2).reshape(n, -1, 16) & 3
    sc = ((low | (high << 4)).astype(np.int16) - 32).astype(np.float32)  # (n, super, 16)
    ql = (qs.reshape(n, -1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3  # (n, super, 2, 4, 32)
    qh = (hmask[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # (n, super, 8, 32)
    q = (ql.reshape(n, -1, 8, 32) + 4 * qh).reshape(n, k).astype(np.uint8)
    scale = (d * sc).reshape(n, k // 16).astype(np.float32)
    return q, scale, np.full_like(scale, 4.0)


def q2_k(raw: np.ndarray, n: int, k: int):
    """x = d * sc * q - dmin * m, q 2-bit, blocks of 16: 8-bit blocks of 16 with a minimum."""
    b = raw.reshape(n, k // QK_K, 84)
    s, qs = b[..., :16], b[..., 16:80]
    d, dmin = _f16(b[..., 80:82])[..., None], _f16(b[..., 82:84])[..., None]
    q = ((qs.reshape(n, -1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3).reshape(n, k)
    scale = (d * (s & 0x0F).astype(np.float32)).reshape(n, k // 16)
    minimum = (-dmin * (s >> 4).astype(np.float32)).reshape(n, k // 16)
    return _with_minimum(q.astype(np.uint8), scale, minimum, 16)


# ggml type -> (decoder, bits, block size) of the exact blockwise forms above.
EXACT = {"Q4_K": (q4_k, 4, 32), "Q6_K": (q6_k, 8, 16), "Q5_0": (q5_0, 8, 32), "Q5_1": (q5_1, 8, 32),
         "Q5_K": (q5_k, 8, 32), "Q3_K": (q3_k, 8, 16), "Q2_K": (q2_k, 8, 16)}
