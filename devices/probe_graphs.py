"""Probing one kernel configuration: a one-node graph of it, run on this machine with 1 and M rows.

`probe` builds the node with seeded random weights of the configuration's exact shape and
attributes, opens a session with the model's session options on the model's providers, and compares
outputs bitwise: each of a few rows alone against the same row in the widest pass, and each pass of
2..M rows against the widest pass's first rows (and the widest pass against itself: a kernel that
is not deterministic is not invariant). GroupQueryAttention's rows are new query tokens after a few
cached lengths, over one buffer bound as past and present (as the model binds its cache); its
present entries are compared too. See devices/invariance.py for why.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_infer.contract.io_names import POSITION_IDS, QUERY_SEQLENS  # also GroupQueryAttention's input names
from edge_infer.devices.invariance import (FROM_TWO, GQA_SLOTS, MS, NOT_INVARIANT, ROW_INVARIANT, UNKNOWN,
                                           KernelConfig, ProbeResult)

if TYPE_CHECKING:
    import onnx

ROWS = (2, 3, 4, 5, 8, 13, 16, 33)  # M: passes compared with the widest one, row by row
ONE_ROW = 4  # rows checked alone against the widest pass
PASTS = (0, 37, 300)  # GroupQueryAttention: cached positions before the probed pass


def probe(config: KernelConfig, make_options: Callable[[], Any], providers: Sequence) -> ProbeResult:
    """Run `config` as a one-node graph and classify it (see the module docstring)."""
    from edge_infer.devices.ort import ort

    t0 = time.perf_counter()
    if config.get("unprobed"):
        return ProbeResult(config, UNKNOWN, "the probe cannot rebuild it")
    run_config = config.probed()
    rng = np.random.default_rng(int(hashlib.sha256(config.key().encode()).hexdigest()[:8], 16))
    try:
        builder: _GQAProbe | _MatMulProbe = (_GQAProbe(run_config, rng) if config.op == "GroupQueryAttention"
                                             else _MatMulProbe(run_config, rng))
        session = ort.InferenceSession(builder.model().SerializeToString(), make_options(), providers=list(providers))
        verdict, detail = builder.compare(session)
    except _Unprobed as e:
        verdict, detail = UNKNOWN, str(e)
    except Exception as e:  # onnxruntime's own error types: the kernel refused this configuration
        verdict, detail = UNKNOWN, f"probe failed: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
    return ProbeResult(config, verdict, detail, cached=False, seconds=time.perf_counter() - t0)


class _Unprobed(Exception):
    """A configuration the probe cannot build (an input it does not know how to feed)."""


def _classify(one: list[tuple[int, float]], wide: list[tuple[int, float]]) -> tuple[str, str]:
    """one: (rows, max |diff|) of each lone row against the widest pass; wide: (M, max |diff|) of each
    M-row pass against the widest pass's first M rows. -1 rows: the widest pass twice (determinism)."""
    bad_wide = [(m, d) for m, d in wide if d != 0]
    bad_one = [d for _, d in one if d != 0]
    if bad_wide:
        m, d = bad_wide[0]
        what = "two runs of the same pass" if m < 0 else f"{m} vs {max(ROWS)} rows"
        return NOT_INVARIANT, f"{what}: up to {d:.3g}"
    if bad_one:
        return FROM_TWO, f"1 vs 2+ rows: up to {max(bad_one):.3g}"
    return ROW_INVARIANT, ""


def rows_verdict(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> tuple[str, str]:
    """(verdict, detail) of a row-wise kernel `run`: (rows, K) -> (rows, N), on the rows of x (max(ROWS), K)."""
    full = run(x)
    wide = [(-1, _maxdiff(run(x), full))] + [(m, _maxdiff(run(x[:m]), full[:m])) for m in ROWS[:-1]]
    one = [(i, _maxdiff(run(x[i:i + 1]), full[i:i + 1])) for i in range(ONE_ROW)]
    return _classify(one, wide)


def _np_dtype(name: str) -> np.dtype:
    """numpy's dtype for a name as KernelConfig spells it ("float" is float32, as in ONNX)."""
    return np.dtype("float32" if name == "float" else name)


def _maxdiff(a: np.ndarray, b: np.ndarray) -> float:
    """0.0 exactly when a and b hold the same bits (NaNs in the same places count as equal)."""
    if a.shape != b.shape:
        return float("inf")
    if np.array_equal(a.view(np.uint8), b.view(np.uint8)):
        return 0.0
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float(np.nanmax(d)) if np.isfinite(d).any() and np.nanmax(d) > 0 else float("inf")


class _MatMulProbe:
    """MatMulNBits / MatMul / Gemm: x (rows, K) -> y (rows, N), the weight random but of the exact kind."""

    def __init__(self, config: KernelConfig, rng: np.random.Generator):
        self.c, self.rng = config, rng
        self.dtype = _np_dtype(config.get("dtype"))

    def model(self) -> onnx.ModelProto:
        from onnx import helper, numpy_helper

        c, rng, dt = self.c, self.rng, self.dtype
        K, N = c.get("K"), c.get("N")
        onnx_dt = helper.np_dtype_to_tensor_dtype(dt)
        inits, ins, attrs = [], ["x"], {}
        if c.op == "MatMulNBits":
            bits, block = c.get("bits"), c.get("block_size")
            blocks = (K + block - 1) // block
            blob = block * bits // 8
            inits.append(numpy_helper.from_array(rng.integers(0, 256, (N, blocks, blob), dtype=np.uint8), "w"))
            inits.append(numpy_helper.from_array((rng.random((N, blocks)) * 0.02 + 0.001).astype(dt), "scales"))
            ins += ["w", "scales"]
            zp = c.get("zero_points")
            if zp == "uint8":
                per_byte = 8 // bits
                inits.append(numpy_helper.from_array(
                    rng.integers(0, 256, (N, (blocks + per_byte - 1) // per_byte), dtype=np.uint8), "zp"))
            elif zp:
                if zp == "dynamic":
                    raise _Unprobed("zero points computed in the graph")
                inits.append(numpy_helper.from_array(rng.standard_normal((N, blocks)).astype(_np_dtype(zp)), "zp"))
            ins.append("zp" if zp else "")
            if c.get("g_idx"):
                raise _Unprobed("g_idx (act-order) weights")
            if c.get("bias"):
                inits.append(numpy_helper.from_array(rng.standard_normal(N).astype(dt), "bias"))
                ins += ["", "bias"]
            attrs = dict(K=K, N=N, bits=bits, block_size=block, accuracy_level=c.get("accuracy_level"))
            node = helper.make_node("MatMulNBits", ins, ["y"], domain=MS, **attrs)
        else:
            trans_b = c.get("transB", 0)
            w = rng.standard_normal((N, K) if trans_b else (K, N), dtype=np.float32).astype(dt) * dt.type(K ** -0.5)
            inits.append(numpy_helper.from_array(w, "w"))
            ins.append("w")
            if c.op == "Gemm":
                if c.get("bias"):
                    inits.append(numpy_helper.from_array(rng.standard_normal(N).astype(dt), "bias"))
                    ins.append("bias")
                attrs = dict(transB=trans_b, alpha=c.get("alpha"), beta=c.get("beta"))
            node = helper.make_node(c.op, ins, ["y"], **attrs)
        x_shape: list[Any] = ["rows", K] if c.op == "Gemm" else [1, "rows", K]  # Gemm is 2-D
        graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("x", onnx_dt, x_shape)],
                                  [helper.make_tensor_value_info("y", onnx_dt, None)], initializer=inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)],
                                 ir_version=10)

    def compare(self, session) -> tuple[str, str]:
        x = self.rng.standard_normal((max(ROWS), self.c.get("K"))).astype(self.dtype)  # (rows, K)

        def run(rows: np.ndarray) -> np.ndarray:  # (rows, K) -> (rows, N)
            feed = rows if self.c.op == "Gemm" else rows[None]
            return session.run(None, {"x": np.ascontiguousarray(feed)})[0].reshape(len(rows), -1)

        return rows_verdict(run, x)


class _GQAProbe:
    """GroupQueryAttention over one shared cache buffer (bound as past and present, as the model
    binds it): a pass of M new query rows after P cached positions, against passes of fewer rows."""

    def __init__(self, config: KernelConfig, rng: np.random.Generator):
        self.c, self.rng = config, rng
        self.capacity = max(PASTS) + max(ROWS) + 1
        self.heads, self.kv_heads, self.head_dim = config.get("num_heads"), config.get("kv_num_heads"), config.get("head_dim")
        self.feeds = dict(config.get("feeds"))
        for slot, how in self.feeds.items():
            if how == "dynamic" and slot not in ("query", "key", "value", POSITION_IDS, QUERY_SEQLENS):
                raise _Unprobed(f"GroupQueryAttention's {slot} is computed in the graph")
        self.dtype, self.past_dtype = _np_dtype(config.get("dtype")), _np_dtype(config.get("past_dtype"))
        self.packed = not self.feeds.get("key")

    def model(self) -> onnx.ModelProto:
        from onnx import TensorProto, helper, numpy_helper

        c, rng = self.c, self.rng
        dt = helper.np_dtype_to_tensor_dtype(self.dtype)
        ins, inputs, inits = [], [], []
        q_width = (self.heads + 2 * self.kv_heads) * self.head_dim if self.packed else self.heads * self.head_dim
        kv_width = self.kv_heads * self.head_dim
        for slot in GQA_SLOTS:
            how = self.feeds.get(slot, "dynamic")
            if slot in ("past_key", "past_value"):
                shape = [1, self.kv_heads, self.capacity, c.get("past_width")]
                inputs.append(helper.make_tensor_value_info(slot, helper.np_dtype_to_tensor_dtype(self.past_dtype), shape))
            elif slot in ("seqlens_k", QUERY_SEQLENS) and how:
                inputs.append(helper.make_tensor_value_info(slot, TensorProto.INT32, [1]))
            elif slot == "total_sequence_length":
                inputs.append(helper.make_tensor_value_info(slot, TensorProto.INT32, []))
            elif slot == POSITION_IDS and how:
                inputs.append(helper.make_tensor_value_info(slot, TensorProto.INT64, [1, "rows"]))
            elif slot in ("query", "key", "value") and how:
                width = q_width if slot == "query" else kv_width
                inputs.append(helper.make_tensor_value_info(slot, dt, [1, "rows", width]))
            elif how and how != "dynamic":  # an initializer: random values of its dtype and shape
                dtype, shape = how.split("[")[0], json.loads("[" + how.split("[", 1)[1])
                if slot in ("cos_cache", "sin_cache"):
                    shape = [self.capacity] + shape
                    values = rng.uniform(-1, 1, shape)
                elif slot in ("k_scale", "v_scale"):
                    values = rng.uniform(0.01, 0.1, shape)
                elif slot in ("q_norm_weight", "k_norm_weight"):
                    values = rng.uniform(0.5, 1.5, shape)
                else:
                    values = rng.standard_normal(shape)
                inits.append(numpy_helper.from_array(values.astype(_np_dtype(dtype)), slot))
            elif how == "dynamic":
                raise _Unprobed(f"GroupQueryAttention's {slot} is computed in the graph")
            ins.append(slot if how or slot in ("past_key", "past_value", "seqlens_k", "total_sequence_length") else "")
        while ins and not ins[-1]:
            ins.pop()
        attrs = {k: v for k, v in c.params if k not in ("head_dim", "dtype", "past_dtype", "past_width", "feeds")}
        node = helper.make_node("GroupQueryAttention", ins, ["out", "present_key", "present_value"], domain=MS, **attrs)
        outputs = [helper.make_tensor_value_info("out", dt, None),
                   helper.make_tensor_value_info("present_key", helper.np_dtype_to_tensor_dtype(self.past_dtype), None),
                   helper.make_tensor_value_info("present_value", helper.np_dtype_to_tensor_dtype(self.past_dtype), None)]
        graph = helper.make_graph([node], "probe", inputs, outputs, initializer=inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)],
                                 ir_version=10)

    def _random_cache(self) -> np.ndarray:  # (1, kv_heads, capacity, past_width)
        shape = (1, self.kv_heads, self.capacity, self.c.get("past_width"))
        if self.past_dtype.kind == "f":
            return self.rng.standard_normal(shape).astype(self.past_dtype)
        info = np.iinfo(self.past_dtype)
        return self.rng.integers(info.min, info.max, shape, dtype=self.past_dtype, endpoint=True)

    def compare(self, session) -> tuple[str, str]:
        from edge_infer.devices.ort import ort

        widest = max(ROWS)
        q_width = (self.heads + 2 * self.kv_heads) * self.head_dim if self.packed else self.heads * self.head_dim
        kv_width = self.kv_heads * self.head_dim
        new = {"query": self.rng.standard_normal((1, widest, q_width)).astype(self.dtype)}
        if not self.packed:
            new["key"] = self.rng.standard_normal((1, widest, kv_width)).astype(self.dtype)
            new["value"] = self.rng.standard_normal((1, widest, kv_width)).astype(self.dtype)
        caches = (self._random_cache(), self._random_cache())

        def run(past: int, start: int, rows: int, kv: tuple[np.ndarray, np.ndarray]):
            """rows new query rows (taken from row `start` on) at positions past + start ...; returns
            the attention output (rows, width) and the cache buffers after the pass."""
            k, v = (np.array(kv[0]), np.array(kv[1]))
            binding = session.io_binding()
            binding.bind_output("out")  # bound first, so it comes back first
            for name, arr in new.items():
                binding.bind_cpu_input(name, np.ascontiguousarray(arr[:, start:start + rows]))
            kv_values = [ort.OrtValue.ortvalue_from_numpy(k), ort.OrtValue.ortvalue_from_numpy(v)]
            for name, value in zip(("past_key", "past_value"), kv_values):
                binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output("present_key", kv_values[0])
            binding.bind_ortvalue_output("present_value", kv_values[1])
            end = past + start + rows
            binding.bind_cpu_input("seqlens_k", np.array([end - 1], np.int32))
            binding.bind_cpu_input("total_sequence_length", np.array(end, np.int32))
            if self.feeds.get(QUERY_SEQLENS):
                binding.bind_cpu_input(QUERY_SEQLENS, np.array([rows], np.int32))
            if self.feeds.get(POSITION_IDS):
                binding.bind_cpu_input(POSITION_IDS, np.arange(past + start, end, dtype=np.int64)[None])
            session.run_with_iobinding(binding)
            out = binding.get_outputs()[0].numpy().reshape(rows, -1)  # (rows, heads * head_dim)
            return out, (k, v)

        one, wide = [], []
        for past in PASTS:
            full, after = run(past, 0, widest, caches)
            again, _ = run(past, 0, widest, caches)
            wide.append((-1, _maxdiff(again, full)))
            for m in ROWS[:-1]:
                out, kv = run(past, 0, m, caches)
                wide.append((m, max(_maxdiff(out, full[:m]),
                                    *(_maxdiff(kv[j][:, :, :past + m], after[j][:, :, :past + m]) for j in (0, 1)))))
            for i in range(ONE_ROW):  # row i alone, after the widest pass's first i rows
                out, kv = run(past, i, 1, after)
                one.append((i, max(_maxdiff(out, full[i:i + 1]),
                                   *(_maxdiff(kv[j], after[j]) for j in (0, 1)))))
        return _classify(one, wide)
