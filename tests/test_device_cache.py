"""The device-resident KV cache (runtime/device_cache.py), the CUDA path, run on the CPU.

`Model.kv_device` is "cuda" when the model runs on CUDA; here it is set to "cpu", so the same code
binds OrtValues that onnxruntime allocated itself (no numpy array behind them) by address. Checked
against the host cache in the same run: the same logits bit for bit, greedy ids, batched row views;
and that a pass moves only its small inputs and its logits, never the cache.
"""

from __future__ import annotations

import numpy as np
import pytest

import edge_infer
from edge_infer.devices.ort import ort
from edge_infer.runtime.cache import KVCache
from edge_infer.runtime.device_cache import DeviceKVCache

IDS = [5, 17, 42, 99, 7, 250, 31, 8]


@pytest.fixture(scope="module")
def model(tiny_exports):
    return edge_infer.load(tiny_exports("llama", "int4"), device="cpu")


def greedy_logits(model, cache, n: int = 12) -> tuple[list[int], list[np.ndarray]]:
    logits = model.forward(np.array([IDS]), cache)[0, -1]
    ids, seen = [], [logits]
    for _ in range(n):
        ids.append(int(logits.argmax()))
        logits = model.forward(np.array([[ids[-1]]]), cache)[0, -1]
        seen.append(logits)
    return ids, seen


def test_cpu_model_keeps_host_arrays_and_cuda_would_not(model):
    assert model.kv_device is None and type(model.new_cache()) is KVCache
    from edge_infer.runtime.device_cache import DEVICE_KV

    assert DEVICE_KV["cuda"] == "cuda"  # what Model.__init__ picks for a CUDA plan


def test_device_cache_gives_the_host_cache_bits(model, monkeypatch):
    host_ids, host = greedy_logits(model, model.new_cache())
    monkeypatch.setattr(model, "kv_device", "cpu")
    cache = model.new_cache()
    assert isinstance(cache, DeviceKVCache) and cache.keys == [] and cache.values == []
    ids, dev = greedy_logits(model, cache)
    assert ids == host_ids
    for a, b in zip(host, dev):
        np.testing.assert_array_equal(a, b)  # same kernels, same bits
    # prefix reuse and rollback move only the offset: trimming and running again gives the same bits
    cache.trim(len(IDS))
    again = model.forward(np.array([[host_ids[0]]]), cache)[0, -1]
    np.testing.assert_array_equal(again, host[1])


def test_a_pass_moves_only_its_inputs_and_logits(model, monkeypatch):
    """Every host buffer a decode step hands onnxruntime is counted: ids, mask, positions, lengths and
    the logits. The KV buffers are bound once (the binding is reused) and never read back."""
    monkeypatch.setattr(model, "kv_device", "cpu")
    cache = model.new_cache()
    model.forward(np.array([IDS]), cache)
    buffers = cache.device_values()
    addresses = [v.data_ptr() for v in buffers]
    binding = next(iter(cache._bindings.values()))
    moved: list[int] = []
    reads: list[str] = []
    real_bind, real_from_numpy, real_numpy = ort.IOBinding.bind_cpu_input, ort.OrtValue.ortvalue_from_numpy, \
        ort.OrtValue.numpy

    def bind_cpu_input(self, name, array):
        moved.append(np.asarray(array).nbytes)
        return real_bind(self, name, array)

    def from_numpy(array, *a, **kw):
        moved.append(array.nbytes)
        return real_from_numpy(array, *a, **kw)

    def numpy(self):
        reads.append(self.device_name())
        return real_numpy(self)

    monkeypatch.setattr(ort.IOBinding, "bind_cpu_input", bind_cpu_input)
    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_numpy", staticmethod(from_numpy))
    monkeypatch.setattr(ort.OrtValue, "numpy", numpy)
    steps = 6
    for t in range(steps):
        model.forward(np.array([[3 + t]]), cache)
    one_layer = cache.nbytes() // len(buffers)
    vocab = model.manifest.geometry.vocab_size
    per_step = sum(moved) / steps
    assert per_step <= 4 * vocab + 8 * (4 + 2 * model.max_length), per_step  # logits + small int64 inputs
    assert per_step < one_layer  # not even one layer's keys cross per step
    assert reads == []  # nothing read a buffer back to the host
    assert [v.data_ptr() for v in buffers] == addresses  # the same device memory every step
    assert next(iter(cache._bindings.values())) is binding and len(cache._bindings) == 1  # bound once


def test_row_views_of_a_batched_device_cache(model, monkeypatch):
    """A server's slots: rows of one batch cache, bound by address, equal to the host cache's rows."""
    results = []
    for device in (None, "cpu"):
        monkeypatch.setattr(model, "kv_device", device)
        cache = model.new_cache(batch=2)
        a, b = cache.row(0), cache.row(1)
        model.forward(np.array([IDS[:5]]), a)
        model.forward(np.array([IDS[2:]]), b)
        assert cache.lengths.tolist() == [a.offset, b.offset] == [5, len(IDS) - 2]  # the views move the parent
        step = model.decode_batch(np.array([11, 12]), cache)
        results.append(step)
    np.testing.assert_array_equal(results[0], results[1])
