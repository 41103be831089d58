"""The batch invariance probe (devices/invariance.py, probe_graphs.py, probe_cache.py) and the padding it
picks (devices/padding.py): configurations read from graphs, verdicts on synthetic kernels and on
this machine's, the cache (hits, key changes, a cache that cannot be written), the mode choice."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edge_infer
from edge_infer.contract.errors import UserError
from edge_infer.devices import cpu_session_options, padding
from edge_infer.devices import probe_cache as cache_module
from edge_infer.devices.invariance import (FROM_TWO, NOT_INVARIANT, ROW_INVARIANT, UNKNOWN, KernelConfig, ProbeResult,
                                           kernel_configs)
from edge_infer.devices.probe_cache import ProbeCache, cache_root, machine_key, probe_graph
from edge_infer.devices.probe_graphs import ROWS, probe, rows_verdict

CPU = ["CPUExecutionProvider"]
MS = "com.microsoft"


def options():
    o = cpu_session_options(2)
    o.log_severity_level = 3
    return o


def nbits(K=64, N=32, bits=4, acc=4, zero_points="uint8", **over) -> KernelConfig:
    params = {"K": K, "N": N, "bits": bits, "block_size": 32, "accuracy_level": acc, "dtype": "float",
              "zero_points": zero_points, "g_idx": 0, "bias": 0, **over}
    return KernelConfig("MatMulNBits", tuple(params.items()))


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_INFER_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


# --- what a graph runs


def synthetic_graph() -> onnx.ModelProto:
    """x (1, s, 64) -> MatMulNBits twice (one configuration) -> MatMul on a weight -> MatMul on a
    transposed weight; y (s, 16) -> Gemm with transB and a bias; a MatMul of two activations (no weight)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.integers(0, 255, (32, 2, 16), dtype=np.uint8), "w4"),
             numpy_helper.from_array(np.ones((32, 2), np.float32), "s4"),
             numpy_helper.from_array(np.zeros((32, 1), np.uint8), "z4"),
             numpy_helper.from_array(rng.integers(0, 255, (64, 1, 16), dtype=np.uint8), "w4b"),
             numpy_helper.from_array(np.ones((64, 1), np.float32), "s4b"),
             numpy_helper.from_array(np.zeros((64, 1), np.uint8), "z4b"),
             numpy_helper.from_array(np.ones((64, 24), np.float32), "wf"),
             numpy_helper.from_array(np.ones((16, 24), np.float32), "embed"),
             numpy_helper.from_array(np.ones((8, 16), np.float32), "wg"),
             numpy_helper.from_array(np.ones(8, np.float32), "bg")]
    nodes = [helper.make_node("MatMulNBits", ["x", "w4", "s4", "z4"], ["a"], domain=MS, K=64, N=32, bits=4,
                              block_size=32, accuracy_level=4),
             helper.make_node("MatMulNBits", ["a", "w4b", "s4b", "z4b"], ["b"], domain=MS, K=32, N=64, bits=4,
                              block_size=32, accuracy_level=4),
             helper.make_node("MatMulNBits", ["x", "w4", "s4", "z4"], ["a2"], domain=MS, K=64, N=32, bits=4,
                              block_size=32, accuracy_level=4),
             helper.make_node("MatMul", ["b", "wf"], ["c"]),
             helper.make_node("Transpose", ["embed"], ["embed_t"], perm=[1, 0]),
             helper.make_node("MatMul", ["c", "embed_t"], ["d"]),
             helper.make_node("Gemm", ["y", "wg", "bg"], ["e"], transB=1),
             helper.make_node("MatMul", ["a", "a2"], ["f"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", 64]),
                                           helper.make_tensor_value_info("y", TensorProto.FLOAT, ["s", 16])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "defa"],
                              initializer=inits)
    return helper.make_model(graph)


def test_configs_of_a_synthetic_graph():
    got = [c.describe() for c in kernel_configs(synthetic_graph())]
    assert got == ["MatMulNBits bits=4 block=32 acc=4 K=64 N=32 zp=uint8",
                   "MatMulNBits bits=4 block=32 acc=4 K=32 N=64 zp=uint8",
                   "MatMul float K=64 N=24", "MatMul float K=24 N=16", "Gemm float K=16 N=8",
                   "MatMul (not a 2-D weight after one input of activations)"]  # its verdict: unknown


def test_configs_of_an_export_and_their_verdicts_here(tiny_exports):
    """Every kind in a tiny int4 export (float cache, and an int8 cache with its scales) is probed: no
    configuration is left unknown, and the attention's verdict is one of the two a padded row fixes."""
    for folder in (tiny_exports("llama", "int4"), tiny_exports("llama", "int4", kv_cache="int8")):
        proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
        configs = kernel_configs(proto)
        ops = [c.op for c in configs]
        assert ops.count("GroupQueryAttention") == 1 and ops.count("MatMulNBits") == 5, ops
        results = probe_graph(configs, options, CPU, 2)
        assert all(r.verdict != UNKNOWN for r in results), [r.line() for r in results]
        gqa = next(r for r in results if r.config.op == "GroupQueryAttention")
        assert gqa.verdict in (ROW_INVARIANT, FROM_TWO), gqa.line()


# --- verdicts


class FakeKernel:
    """x @ w in float64, rounded to float32, with a nudge for some row counts: a kernel whose one-row
    path (or whose path above `wide_from` rows) sums differently."""

    def __init__(self, one_row_nudge=0.0, wide_from=None, noisy=False):
        self.w = np.random.default_rng(1).standard_normal((64, 8))
        self.one_row_nudge, self.wide_from, self.noisy, self.calls = one_row_nudge, wide_from, noisy, 0

    def __call__(self, rows: np.ndarray) -> np.ndarray:  # (rows, 64) -> (rows, 8)
        self.calls += 1
        y = rows.astype(np.float64) @ self.w
        if len(rows) == 1:
            y *= 1 + self.one_row_nudge
        if self.wide_from is not None and len(rows) >= self.wide_from:
            y *= 1 + 1e-6
        if self.noisy:
            y *= 1 + 1e-6 * self.calls
        return y.astype(np.float32)


@pytest.mark.parametrize("kernel, verdict", [
    (FakeKernel(), ROW_INVARIANT),
    (FakeKernel(one_row_nudge=1e-6), FROM_TWO),  # the AMD EPYC's 4-bit MatMulNBits
    (FakeKernel(wide_from=5), NOT_INVARIANT),  # 2 to 4 rows agree, 5 and more do not
    (FakeKernel(noisy=True), NOT_INVARIANT),  # not even deterministic
])
def test_verdicts_on_synthetic_kernels(kernel, verdict):
    x = np.random.default_rng(0).standard_normal((max(ROWS), 64)).astype(np.float32)
    got, detail = rows_verdict(kernel, x)
    assert got == verdict, detail
    assert (detail == "") == (verdict == ROW_INVARIANT)


def test_the_probe_agrees_with_a_direct_measurement_here():
    """The probe's verdict for real kernels equals a 1-row vs 2..8-row measurement of the same kind of
    node with other weights and inputs (accuracy level 0 and 4, bits 4 and 8, a float MatMul)."""
    configs = [nbits(K=576, N=256), nbits(K=576, N=256, acc=0), nbits(K=576, N=256, bits=8, zero_points="", acc=0),
               KernelConfig("MatMul", (("K", 576), ("N", 256), ("dtype", "float")))]
    rng = np.random.default_rng(7)
    from edge_infer.devices.ort import ort

    for config in configs:
        result = probe(config, options, CPU)
        d = dict(config.params)
        if config.op == "MatMul":
            w = numpy_helper.from_array(rng.standard_normal((576, 256)).astype(np.float32), "w")
            node, inits = helper.make_node("MatMul", ["x", "w"], ["y"]), [w]
        else:
            blob = 32 * d["bits"] // 8
            inits = [numpy_helper.from_array(rng.integers(0, 256, (256, 18, blob), dtype=np.uint8), "w"),
                     numpy_helper.from_array(rng.uniform(0.001, 0.02, (256, 18)).astype(np.float32), "s")]
            node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain=MS, K=576, N=256, bits=d["bits"],
                                    block_size=32, accuracy_level=d["accuracy_level"])
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", 576])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])
        session = ort.InferenceSession(model.SerializeToString(), options(), providers=CPU)
        x = rng.standard_normal((1, 8, 576)).astype(np.float32)
        wide = session.run(None, {"x": x})[0][0]
        alone = np.concatenate([session.run(None, {"x": x[:, i:i + 1]})[0][0] for i in range(4)])
        direct = ROW_INVARIANT if np.array_equal(alone, wide[:4]) else FROM_TWO
        assert result.verdict == direct, (result.line(), direct)


def test_a_configuration_it_cannot_build_is_unknown():
    result = probe(nbits(g_idx=1), options, CPU)
    assert result.verdict == UNKNOWN and "g_idx" in result.detail
    assert "could not be probed" in padding.choose([result], "auto").reason


def test_wide_weights_are_probed_at_a_capped_width():
    wide = nbits(K=576, N=49152, bits=8, zero_points="")
    assert wide.probed().get("N") == 4096 and wide.describe().endswith("N=49152")
    assert wide.key() == nbits(K=576, N=151936, bits=8, zero_points="").key()  # one probe for both


# --- the cache


def test_a_second_probe_is_a_cache_hit(cache_dir, monkeypatch):
    configs = [nbits(), nbits(N=64)]
    first = probe_graph(configs, options, CPU, 2)
    assert not any(r.cached for r in first) and list(cache_dir.glob("batch-invariance/*.json"))

    def no_probe(*a, **kw):
        raise AssertionError("probed again")

    monkeypatch.setattr(cache_module, "probe", no_probe)
    again = probe_graph(configs, options, CPU, 2)
    assert all(r.cached for r in again) and [r.verdict for r in again] == [r.verdict for r in first]


def test_a_changed_machine_key_probes_again(monkeypatch):
    probe_graph([nbits()], options, CPU, 2)
    calls = []
    real = cache_module.probe

    def counting(config, *a, **kw):
        calls.append(config)
        return real(config, *a, **kw)

    monkeypatch.setattr(cache_module, "probe", counting)
    probe_graph([nbits()], options, CPU, 1)  # another thread count
    monkeypatch.setattr(cache_module, "cpu_identity", lambda: {"cpu": "AMD EPYC", "machine": "x86_64",
                                                               "flags_sha256": "0123"})
    probe_graph([nbits()], options, CPU, 2)  # another CPU
    probe_graph([nbits(acc=0)], options, CPU, 2)  # another configuration
    assert len(calls) == 3
    key = machine_key(CPU, 2)
    assert key["cpu"] == "AMD EPYC" and key["onnxruntime"] and key["threads"] == 2


def test_a_cache_that_cannot_be_written_or_read_does_not_break_loading(tmp_path, tiny_exports, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("EDGE_INFER_CACHE_DIR", str(blocker))  # mkdir under a file fails, even as root
    assert probe_graph([nbits()], options, CPU, 2)[0].verdict != UNKNOWN
    assert edge_infer.load(tiny_exports("llama", "int4"), device="cpu", threads=2).batch_invariant
    good = tmp_path / "c"
    monkeypatch.setenv("EDGE_INFER_CACHE_DIR", str(good))
    cache = ProbeCache(machine_key(CPU, 2))
    cache.path.parent.mkdir(parents=True)
    cache.path.write_text("{broken json")
    assert not probe_graph([nbits()], options, CPU, 2)[0].cached
    assert json.loads(cache.path.read_text())["results"]  # rewritten whole


def test_the_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_INFER_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    monkeypatch.delenv("EDGE_INFER_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "edge-infer"


# --- the padding a model gets


def verdicts(matmul: str) -> list[ProbeResult]:
    """The default model's attention (two rows needed, as on both known CPUs) and a 4-bit MatMulNBits."""
    gqa = KernelConfig("GroupQueryAttention", (("num_heads", 9), ("kv_num_heads", 3), ("head_dim", 64),
                                               ("past_dtype", "float")))
    detail = "1 vs 2+ rows: up to 1.5e-06" if matmul == FROM_TWO else ""
    return [ProbeResult(gqa, FROM_TWO, "up to 4.8e-07"), ProbeResult(nbits(K=576, N=1536), matmul, detail)]


def test_the_cheapest_verified_mode_is_chosen():
    invariant = verdicts(ROW_INVARIANT)
    assert padding.choose(invariant, "auto").mode == "attention"
    amd = padding.choose(verdicts(FROM_TWO), "auto")
    assert amd.mode == "rows" and amd.invariant and not amd.forced
    assert amd.reason.startswith("MatMulNBits bits=4 block=32 acc=4 K=576 N=1536 zp=uint8 differs between 1 and 2 "
                                 "rows on this CPU (1 vs 2+ rows: up to 1.5e-06)")
    forced = padding.choose(verdicts(FROM_TWO), "attention")
    assert forced.mode == "attention" and not forced.invariant and forced.forced
    rows = padding.choose(invariant, "rows")
    assert rows.mode == "rows" and rows.invariant and "attention alone would do" in rows.reason
    broken = padding.choose(verdicts(NOT_INVARIANT), "auto")
    assert not broken.invariant and "no padding makes passes agree" in broken.reason
    with pytest.raises(UserError, match="cannot be met"):
        padding.unpadded("the graph concatenates its cache", "rows")
    assert not padding.unpadded("the graph concatenates its cache", "auto").invariant


def test_the_requested_mode(monkeypatch):
    monkeypatch.delenv("EDGE_INFER_PADDING", raising=False)
    assert padding.requested(None) == "auto"
    monkeypatch.setenv("EDGE_INFER_PADDING", "rows")
    assert padding.requested(None) == "rows" and padding.requested("attention") == "attention"
    with pytest.raises(UserError, match="padding='both' is not a padding mode"):
        padding.requested("both")


def test_inspect_and_devices_say_the_padding_and_why(tiny_exports):
    from click.testing import CliRunner

    from edge_infer.cli import main

    folder = str(tiny_exports("llama", "int4"))
    out = CliRunner().invoke(main, ["inspect", folder, "--threads", "2"])
    assert out.exit_code == 0, out.output
    line = next(x for x in out.output.splitlines() if x.startswith("padding"))
    assert ("attention" in line or "rows" in line) and "batch-invariant" in line
    out = CliRunner().invoke(main, ["devices", "--threads", "2"])
    assert out.exit_code == 0, out.output
    assert "batch invariance" in out.output and "MatMulNBits bits=4 block=32 acc=4 K=64 N=128" in out.output
