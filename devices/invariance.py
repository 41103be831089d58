"""Batch invariance, measured on this machine: which kernels a graph runs whose result for a row
could depend on how many rows share its pass.

A position's logits are the same bits however its pass was grouped (a one-token decode step, a
speculative verification, a prefill chunk, a row of the server's batched step) only if every op
whose arithmetic depends on the number of rows gives each row the same bits for any count. Which
ops do is a property of the CPU and of onnxruntime's kernel dispatch, not of the graph (FACTS.md:
a 4-bit MatMulNBits agrees for 1 and M rows on an Intel Xeon and differs by 1.5e-6 on an AVX-512
AMD EPYC, where 2 and M rows agree). The manifest can say what the graph is; what this machine's
kernels do with it can only be measured here:

  * `kernel_configs` (here) collects each distinct configuration the graph runs whose result could
    depend on the row count: every MatMulNBits (K, N, bits, block, accuracy level, zero points,
    bias), a float MatMul / Gemm on a weight initializer, and GroupQueryAttention (new query rows);
  * devices/probe_graphs.py `probe` builds a one-node graph of one configuration with seeded random
    weights, runs it in a session made like the model's (same options, threads and providers) and
    compares a row's output bitwise: alone (1 row) against a pass of M rows, and between passes of
    2 to M rows;
  * devices/probe_cache.py keeps the verdicts per onnxruntime version, providers, threads, CPU
    identity and configuration, so a shape class is probed once per machine;
  * devices/padding.py turns the verdicts into the padding a model runs with, and says why.

Verdicts: ROW_INVARIANT (1 == M), FROM_TWO (2 == M, 1 != M: a second row makes it invariant),
NOT_INVARIANT (some M differ even from 2 rows), UNKNOWN (the probe could not build or run it).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_infer.contract.io_names import POSITION_IDS, QUERY_SEQLENS  # also GroupQueryAttention's input names

if TYPE_CHECKING:
    import onnx

ROW_INVARIANT, FROM_TWO, NOT_INVARIANT, UNKNOWN = "row-invariant", "from-2-rows", "not-invariant", "unknown"
# A weight's N changes how the work is split between threads, not how each output is summed: configs
# wider than this are probed at this N (checked on the Intel Xeon: the same verdicts at N 49152 and
# 151936 as at 4096, bits 4 and 8, accuracy levels 0 and 4, float too; benchmarks/RESULTS.md).
N_CAP = 4096
MS = "com.microsoft"
GQA_SLOTS = ("query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length",
             "cos_cache", "sin_cache", POSITION_IDS, "attention_bias", "head_sink", "k_scale", "v_scale",
             "q_norm_weight", "k_norm_weight", QUERY_SEQLENS)


@dataclass(frozen=True)
class KernelConfig:
    """One kernel configuration of a graph: the op and everything that picks its code path."""

    op: str  # "MatMulNBits" | "MatMul" | "Gemm" | "GroupQueryAttention"
    params: tuple[tuple[str, Any], ...]  # (name, value) pairs, hashable; values are ints, floats, strings, tuples

    def get(self, name: str, default: Any = None) -> Any:
        return dict(self.params).get(name, default)

    def probed(self) -> KernelConfig:
        """The configuration the probe runs: N capped at N_CAP (see there)."""
        n = self.get("N")
        if n is None or n <= N_CAP:
            return self
        return KernelConfig(self.op, tuple((k, N_CAP if k == "N" else v) for k, v in self.params))

    def key(self) -> str:
        """The cache key: the probed configuration, spelled canonically."""
        p = self.probed()
        return json.dumps([p.op, [[k, v] for k, v in p.params]], separators=(",", ":"))

    def describe(self) -> str:
        """One line for people: 'MatMulNBits bits=4 block=32 acc=4 K=576 N=1536'."""
        d = dict(self.params)
        if "unprobed" in d:
            return f"{self.op} ({d['unprobed']})"
        if self.op == "MatMulNBits":
            extra = "".join(f" {short}={d[k]}" for k, short in (("zero_points", "zp"), ("bias", "bias"), ("g_idx", "g_idx"))
                            if d.get(k) not in (None, "", 0))
            dtype = "" if d["dtype"] == "float" else f" {d['dtype']}"
            return (f"MatMulNBits bits={d['bits']} block={d['block_size']} acc={d['accuracy_level']} "
                    f"K={d['K']} N={d['N']}{extra}{dtype}")
        if self.op in ("MatMul", "Gemm"):
            return f"{self.op} {d['dtype']} K={d['K']} N={d['N']}"
        kv = d["past_dtype"] + (f" {d['kv_cache_bit_width']}-bit" if d.get("kv_cache_bit_width") else "")
        extra = "".join(f" {short}={d[k]:g}" for k, short in (("local_window_size", "window"), ("softcap", "softcap"))
                        if d.get(k) not in (None, -1, 0, 0.0))
        return (f"GroupQueryAttention heads={d['num_heads']}/{d['kv_num_heads']} head_dim={d['head_dim']}{extra} "
                f"cache {kv}")


@dataclass(frozen=True)
class ProbeResult:
    config: KernelConfig
    verdict: str  # ROW_INVARIANT | FROM_TWO | NOT_INVARIANT | UNKNOWN
    detail: str  # what differed and by how much ("1 vs 2 rows: up to 1.5e-06"), or why unknown
    cached: bool = False
    seconds: float = 0.0  # what probing it cost (0 when cached)

    def line(self) -> str:
        return f"{self.config.describe()}: {self.verdict}" + (f" ({self.detail})" if self.detail else "")


# ---------------------------------------------------------------------------------------------
# What the graph runs


def kernel_configs(proto: onnx.ModelProto) -> list[KernelConfig]:
    """The distinct row-count-sensitive kernel configurations of `proto` (loaded without its
    external data: only initializer shapes and types are read), in graph order."""
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    inputs = {i.name: i for i in g.input}
    producer = {o: n for n in g.node for o in n.output}

    def weight(name: str) -> tuple[tuple[int, ...], int] | None:
        """(shape, data type) of an initializer, or of an initializer seen through a 2-D Transpose."""
        if name in inits:
            return tuple(inits[name].dims), inits[name].data_type
        node = producer.get(name)
        if node is not None and node.op_type == "Transpose" and node.input[0] in inits:
            t = inits[node.input[0]]
            perm = _attrs(node).get("perm", list(range(len(t.dims)))[::-1])
            return tuple(t.dims[p] for p in perm), t.data_type
        return None

    seen: dict[str, KernelConfig] = {}
    for node in g.node:
        if node.op_type not in ("MatMulNBits", "MatMul", "Gemm", "GroupQueryAttention"):
            continue
        config = None
        a = _attrs(node)
        if node.op_type == "MatMulNBits" and node.domain == MS:
            ins = list(node.input) + [""] * 6
            if ins[2] not in inits:
                config = unprobed(node, "scales computed in the graph")
            else:
                zp = _dtype_name(inits[ins[3]].data_type) if ins[3] in inits else ("dynamic" if ins[3] else "")
                config = KernelConfig("MatMulNBits", (
                    ("K", a["K"]), ("N", a["N"]), ("bits", a.get("bits", 4)), ("block_size", a["block_size"]),
                    ("accuracy_level", a.get("accuracy_level", 0)), ("dtype", _dtype_name(inits[ins[2]].data_type)),
                    ("zero_points", zp), ("g_idx", int(bool(ins[4]))), ("bias", int(bool(ins[5])))))
        elif node.op_type in ("MatMul", "Gemm") and node.domain in ("", "ai.onnx") and len(node.input) >= 2:
            w = weight(node.input[1])
            if w is None or len(w[0]) != 2 or node.input[0] in inits:  # two activations, or an odd weight
                config = unprobed(node, "not a 2-D weight after one input of activations")
                seen.setdefault(config.key(), config)
                continue
            (k, n), data_type = w
            trans_b = a.get("transB", 0) if node.op_type == "Gemm" else 0
            if trans_b:
                k, n = n, k
            params: tuple[tuple[str, Any], ...] = (("K", int(k)), ("N", int(n)), ("dtype", _dtype_name(data_type)))
            if node.op_type == "Gemm":
                params += (("transB", int(trans_b)), ("alpha", float(a.get("alpha", 1.0))),
                           ("beta", float(a.get("beta", 1.0))), ("bias", int(len(node.input) > 2 and bool(node.input[2]))))
            config = KernelConfig(node.op_type, params)
        elif node.op_type == "GroupQueryAttention" and node.domain == MS:
            config = _gqa_config(node, a, inits, inputs) or unprobed(node, "its cache is not a graph input of known shape")
        if config is not None:
            seen.setdefault(config.key(), config)
    return list(seen.values())


def unprobed(node: onnx.NodeProto, why: str) -> KernelConfig:
    """A row-sensitive node the probe cannot rebuild: its verdict is UNKNOWN, so nothing is claimed."""
    return KernelConfig(node.op_type, (("unprobed", why),))


@functools.lru_cache(maxsize=None)
def _dtype_name(data_type: int) -> str:
    """An ONNX element type as KernelConfig spells it: 'float' (float32, as ONNX names it), 'float16', 'uint8'."""
    import onnx

    name = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).name
    return "float" if name == "float32" else name


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    import onnx

    out = {}
    for attr in node.attribute:
        v = onnx.helper.get_attribute_value(attr)
        out[attr.name] = v.decode() if isinstance(v, bytes) else (tuple(v) if isinstance(v, list) else v)
    return out


def _gqa_config(node, attrs, inits, inputs) -> KernelConfig | None:
    """GroupQueryAttention's configuration: its attributes, the cache's type and width, and what
    feeds each optional input ('' absent, 'dynamic', or an initializer's dtype and trailing shape)."""
    ins = list(node.input) + [""] * (len(GQA_SLOTS) - len(node.input))
    past = inputs.get(ins[3])
    if past is None:
        return None
    tt = past.type.tensor_type
    dims = [d.dim_value for d in tt.shape.dim]
    if len(dims) != 4 or not dims[3]:
        return None
    bits = int(attrs.get("kv_cache_bit_width", 0) or 0)
    width = dims[3]
    head_dim = width * 8 // bits if bits and bits < 8 else width
    feeds = []
    for slot, name in zip(GQA_SLOTS, ins):
        if slot in ("past_key", "past_value", "seqlens_k", "total_sequence_length"):
            continue
        if not name:
            feeds.append((slot, ""))
        elif name in inits:  # cos/sin caches: their row count is the export's max_length, not a code path
            shape = tuple(inits[name].dims)[1:] if slot in ("cos_cache", "sin_cache") else tuple(inits[name].dims)
            feeds.append((slot, f"{_dtype_name(inits[name].data_type)}{list(shape)}"))
        else:
            feeds.append((slot, "dynamic"))
    past_dtype = _dtype_name(tt.elem_type)
    cos = inits.get(ins[7])  # the activations' dtype: the rotary cache's, else a float cache's
    dtype = _dtype_name(cos.data_type) if cos is not None else (past_dtype if past_dtype.startswith("float") else "float")
    params = tuple(sorted((k, v) for k, v in attrs.items()))
    return KernelConfig("GroupQueryAttention", params + (
        ("head_dim", head_dim), ("dtype", dtype), ("past_dtype", past_dtype), ("past_width", width),
        ("feeds", tuple(feeds))))
