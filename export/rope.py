"""Rotary embedding tables: inverse frequencies (with scaling) and cos/sin caches.

Computed in float32 the way transformers computes them, so the exported graph
rotates exactly like the reference model. Scaling kinds (`RopeSpec.scaling`,
HF `rope_scaling` keys plus what `arch._common.rope_of` resolves):
    default   theta ** (-2i / rotary_dim)
    linear    divided by `factor`
    llama3    Llama 3.1 wavelength bands (factor, low/high_freq_factor, original context)
    factors   divided per dimension by `factors`: a GGUF's rope_freqs.weight, which is
              how llama.cpp's converter stores Llama 3 scaling
    yarn      YaRN blend of interpolated and extrapolated frequencies, cos/sin times
              `attention_factor`
    longrope  divided per dimension by `short_factor`, or by `long_factor` when the exported
              context exceeds `original_max_position_embeddings` (llama.cpp's rule: the
              choice is made once for the graph; transformers switches per sequence length),
              cos/sin times `attention_factor`
"""

from __future__ import annotations

import math

import numpy as np

from edge_infer.export.spec import RopeSpec


def _base(rope: RopeSpec) -> np.ndarray:
    dim = rope.rotary_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return np.float32(rope.theta) ** exponents  # (rotary_dim / 2,)


def inv_freq(rope: RopeSpec, max_length: int | None = None) -> np.ndarray:
    """(rotary_dim / 2,) float32 inverse frequencies after rope scaling."""
    scaling = rope.scaling_dict()
    kind = scaling.get("rope_type", "default")
    if kind == "longrope":
        long = max_length is not None and max_length > int(scaling["original_max_position_embeddings"])
        ext = np.asarray(scaling["long_factor" if long else "short_factor"], dtype=np.float32)
        return (np.float32(1.0) / (ext * _base(rope))).astype(np.float32)
    if kind == "yarn":
        return _yarn(rope, scaling)
    freq = (np.float32(1.0) / _base(rope)).astype(np.float32)
    if kind == "linear":
        freq = (freq / np.float32(scaling["factor"])).astype(np.float32)
    elif kind == "llama3":
        freq = _llama3(freq, scaling)
    elif kind == "factors":
        freq = (freq / np.asarray(scaling["factors"], dtype=np.float32)).astype(np.float32)
    return freq


def attention_factor(rope: RopeSpec) -> float:
    """The factor cos and sin are multiplied by (YaRN, LongRoPE); 1 otherwise."""
    return float(rope.scaling_dict().get("attention_factor", 1.0))


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


def _yarn(rope: RopeSpec, s: dict) -> np.ndarray:
    # Frequencies that turn fewer than beta_slow times over the original context are
    # interpolated (divided by factor), those turning more than beta_fast times kept, a ramp between.
    dim, base = rope.rotary_dim, rope.theta
    factor = float(s["factor"])
    original = float(s["original_max_position_embeddings"])
    beta_fast, beta_slow = float(s.get("beta_fast") or 32), float(s.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation = (1 - ramp).astype(np.float32)
    pos_freqs = _base(rope)
    interp, extrap = np.float32(1.0) / (np.float32(factor) * pos_freqs), np.float32(1.0) / pos_freqs
    return (interp * (1 - extrapolation) + extrap * extrapolation).astype(np.float32)


def cos_sin_cache(rope: RopeSpec, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin, each (max_length, rotary_dim / 2) float32, rows indexed by position."""
    positions = np.arange(max_length, dtype=np.float32)[:, None]  # (max_length, 1)
    angles = (positions * inv_freq(rope, max_length)[None, :]).astype(np.float32)  # (max_length, rotary_dim / 2)
    scale = np.float32(attention_factor(rope))
    return (np.cos(angles) * scale).astype(np.float32), (np.sin(angles) * scale).astype(np.float32)
