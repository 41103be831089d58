"""Rotary embedding tables: inverse frequencies (with scaling) and cos/sin caches.

Computed in float32 the way transformers computes them, so the exported graph
rotates exactly like the reference model.
"""

from __future__ import annotations

import math

import numpy as np

from edge_infer.export.spec import RopeSpec


def inv_freq(rope: RopeSpec) -> np.ndarray:
    """(rotary_dim / 2,) float32 inverse frequencies after rope scaling."""
    dim = rope.rotary_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    freq = (np.float32(1.0) / (np.float32(rope.theta) ** exponents)).astype(np.float32)
    scaling = rope.scaling_dict()
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        freq = (freq / np.float32(scaling["factor"])).astype(np.float32)
    elif kind == "llama3":
        freq = _llama3(freq, scaling)
    return freq


def _llama3(freq: np.ndarray, s: dict) -> np.ndarray:
    # Llama 3.1 keeps high frequencies, divides low ones by `factor`, and blends between.
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / freq
    scaled = np.where(wavelen > low_wavelen, freq / factor, freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def cos_sin_cache(rope: RopeSpec, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin, each (max_length, rotary_dim / 2) float32, rows indexed by position."""
    positions = np.arange(max_length, dtype=np.float32)[:, None]  # (max_length, 1)
    angles = (positions * inv_freq(rope)[None, :]).astype(np.float32)  # (max_length, rotary_dim / 2)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
