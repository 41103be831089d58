"""A quantized KV cache: calibrated per-channel scales and the graph rewrite that uses them.

onnxruntime's GroupQueryAttention keeps past and present keys/values in int8 (or two 4-bit
values per uint8) when it is given `k_scale` / `v_scale`; it quantizes the new entries with
those scales as it writes them and dequantizes as it reads. The scales are inputs of the
graph, fixed at export: one per (kv head, channel), shape (1, kv_heads, 1, head_dim), so each
channel's range comes from what the model actually writes there on calibration text.

Keys are stored after the rotary embedding. Rotation moves a key's energy between channel j
and channel j + rotary_dim / 2 as the position grows, so the largest value a channel can see
at some position of the context is not what calibration text at its own positions showed.
`channel_bounds` bounds it exactly for every position up to max_length: a calibrated pair
(x1, x2) at position p has magnitude R and phase psi; at position q its first channel is
R cos(psi + (q - p) w_j) and its second R sin(...), so the bound is R times the largest |cos|
(|sin|) over the arc of phases q in [0, max_length) reaches. High-frequency channels sweep a
full turn (the bound is R); low-frequency ones a short arc, which keeps their 4-bit range
tight where a pair-magnitude bound would waste most of it (measured on the default model:
perplexity x1.27 with the pair bound at 4 bits, see benchmarks/RESULTS.md for the arc bound).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_infer.contract.io_names import PAST_PREFIX, PRESENT_PREFIX, past

KV_CACHE_KINDS = ("float", "int8", "int4")
# Largest magnitude of a stored value: int8 is symmetric in [-127, 127]; the 4-bit cache in [-7, 7].
QMAX = {"int8": 127, "int4": 7}
BITS = {"int8": 8, "int4": 4}
# Calibration text cannot show every value a channel will hold: int8 keeps 10% headroom above
# the calibrated bound (a 10% coarser step, well inside 8 bits); 4 bits cannot spare it.
HEADROOM = {"int8": 1.1, "int4": 1.0}
TINY = np.float32(1e-6)  # a channel that calibration never saw used still gets a valid scale


@dataclass(frozen=True)
class LayerRope:
    """How a layer rotates its keys: (rotary_dim / 2,) angles per position, over max_length."""
    inv_freq: np.ndarray  # (rotary_dim / 2,) radians per position
    max_length: int


def _max_abs_cos(start: np.ndarray, width: np.ndarray) -> np.ndarray:
    """max |cos(t)| for t in [start, start + width] (elementwise; width >= 0)."""
    k = np.ceil(start / np.pi)  # the first multiple of pi at or after start
    hits = (k * np.pi <= start + width) | (width >= np.pi)
    ends = np.maximum(np.abs(np.cos(start)), np.abs(np.cos(start + width)))
    return np.where(hits, 1.0, ends)


def channel_bounds(keys: np.ndarray, rope: LayerRope | None) -> np.ndarray:
    """(kv_heads, head_dim) bound on |key| per channel over every position up to max_length.

    keys: (kv_heads, n, head_dim) calibrated keys as stored, the one at index p written at
    position p. Channels past rotary_dim (partial rotary) and models without rotary take the
    plain maximum.
    """
    keys = keys.astype(np.float64)
    bound = np.abs(keys).max(axis=1)  # (kv_heads, head_dim)
    if rope is None:
        return bound
    half = len(rope.inv_freq)
    x1, x2 = keys[..., :half], keys[..., half:2 * half]  # (kv_heads, n, half)
    radius = np.hypot(x1, x2)
    w = rope.inv_freq.astype(np.float64)[None, None, :]
    p = np.arange(keys.shape[1], dtype=np.float64)[None, :, None]
    start = np.arctan2(x2, x1) - p * w  # the pair's phase at position 0
    width = np.broadcast_to((rope.max_length - 1) * w, start.shape)
    bound[:, :half] = (radius * _max_abs_cos(start, width)).max(axis=1)
    bound[:, half:2 * half] = (radius * _max_abs_cos(start - np.pi / 2, width)).max(axis=1)
    return bound


def kv_scales(keys: np.ndarray, values: np.ndarray, rope: LayerRope | None,
              kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(k_scale, v_scale), each (1, kv_heads, 1, head_dim) float32, from one layer's calibrated
    keys and values (kv_heads, n, head_dim)."""
    q = QMAX[kind] / HEADROOM[kind]
    k = np.maximum(channel_bounds(keys, rope) / q, TINY).astype(np.float32)
    v = np.maximum(np.abs(values.astype(np.float64)).max(axis=1) / q, TINY).astype(np.float32)
    return k[None, :, None, :], v[None, :, None, :]


def quantize_kv_graph(model: onnx.ModelProto, scales: list[tuple[np.ndarray, np.ndarray]], kind: str) -> None:
    """Rewrite `model` in place so every layer's cache is `kind` ("int8" | "int4") with `scales`
    (one (k_scale, v_scale) per layer, in layer order).

    Past and present tensors change type (int8, or uint8 holding two 4-bit values: head_dim / 2
    bytes per position); each GroupQueryAttention gets its scales as inputs 12 and 13 and the
    per-channel quantization attributes. The scales are stored inline: a few KB per layer.
    """
    if kind not in QMAX:
        raise ValueError(f"kv cache kind must be one of {', '.join(QMAX)}, got {kind!r}")
    g = model.graph
    dtype = TensorProto.INT8 if kind == "int8" else TensorProto.UINT8
    for vi in list(g.input) + list(g.output):
        if vi.name.startswith((PAST_PREFIX, PRESENT_PREFIX)):
            t = vi.type.tensor_type
            t.elem_type = dtype
            if kind == "int4":
                last = t.shape.dim[3]
                if not last.HasField("dim_value") or last.dim_value % 2:
                    raise ValueError(f"{vi.name}: a 4-bit cache needs an even, fixed head dim")
                last.dim_value //= 2
    attention = [n for n in g.node if n.op_type == "GroupQueryAttention"]
    if len(attention) != len(scales):
        raise ValueError(f"{len(scales)} layers of scales for {len(attention)} attention nodes")
    layer_of = {past(i, "key"): i for i in range(len(scales))}
    for node in attention:
        layer = layer_of[node.input[3]]  # input 3: the layer's past key
        k_scale, v_scale = scales[layer]
        k_name, v_name = f"kv_cache.{layer}.k_scale", f"kv_cache.{layer}.v_scale"
        g.initializer.extend([numpy_helper.from_array(k_scale, k_name), numpy_helper.from_array(v_scale, v_name)])
        inputs = list(node.input) + [""] * max(0, 14 - len(node.input))
        inputs[12], inputs[13] = k_name, v_name  # k_scale, v_scale
        del node.input[:]
        node.input.extend(inputs)
        node.attribute.extend([helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                               helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                               helper.make_attribute("kv_cache_bit_width", BITS[kind])])
