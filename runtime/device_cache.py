"""The KV cache in the device's memory: the CUDA path, IOBinding with device OrtValues.

`Model.new_cache` returns a DeviceKVCache when the model runs on CUDA (`Model.kv_device`). Each
layer's keys and values are one buffer that onnxruntime allocates on the GPU
(`OrtValue.ortvalue_from_shape_and_type`), zeroed once, and bound once per session as both past and
present: GroupQueryAttention reads and writes it in place on the device. A pass moves only its small
inputs to the device (ids, mask, positions, lengths) and the logits it keeps back to the host (the
sampler needs them); the cache never crosses. The host cache (runtime/cache.py) instead holds numpy
arrays, which a CUDA session would copy to the GPU and back on every pass.

A row view (a server slot, `rows`) is the same memory at an offset, bound by address
(`IOBinding.bind_input` / `bind_output` with a buffer pointer), so batched slots work as on the host.

The same code runs on the CPU with device "cpu" (OrtValues in onnxruntime's own CPU memory, no
numpy array behind them): tests/test_device_cache.py proves the path there.
"""

from __future__ import annotations

import numpy as np

from edge_infer.devices.ort import ort
from edge_infer.runtime.cache import KVCache
from edge_infer.runtime.manifest import Manifest

DEVICE_KV = {"cuda": "cuda"}  # plan.device -> onnxruntime's OrtValue device name, where the cache lives


class DeviceKVCache(KVCache):
    """A KVCache whose buffers are OrtValues on `device` ("cuda", or "cpu" for tests)."""

    def __init__(self, manifest: Manifest, batch: int = 1, max_length: int | None = None,
                 device: str = "cuda", device_id: int = 0):
        self.device, self.device_id = device, device_id
        super().__init__(manifest, batch, max_length)

    def _allocate(self, g, dtype, width: int) -> None:
        self._shape = (self.batch, g.num_kv_heads, self.max_length, width)  # (batch, kv_heads, max_length, width)
        self._dtype = np.dtype(dtype)
        zeros = np.zeros(self._shape, self._dtype)  # once, at creation: never per pass

        def buffer():
            value = ort.OrtValue.ortvalue_from_shape_and_type(list(self._shape), self._dtype, self.device,
                                                              self.device_id)
            value.update_inplace(zeros)
            return value

        self._buffers = ([buffer() for _ in range(g.num_layers)], [buffer() for _ in range(g.num_layers)])
        self._first_row = 0
        self._bookkeeping()

    @property
    def keys(self) -> list[np.ndarray]:  # type: ignore[override]
        """No host arrays: the keys live on the device only."""
        return []

    @property
    def values(self) -> list[np.ndarray]:  # type: ignore[override]
        return []

    def rows(self, start: int, stop: int) -> KVCache:
        if not 0 <= start < stop <= self.batch:
            raise IndexError(f"rows {start}..{stop - 1} of a cache with batch {self.batch}")
        view = DeviceKVCache.__new__(DeviceKVCache)
        view.device, view.device_id, view.max_length, view.batch = self.device, self.device_id, self.max_length, \
            stop - start
        view._buffers, view._dtype = self._buffers, self._dtype
        view._shape = (stop - start,) + self._shape[1:]
        view._first_row = self._first_row + start
        view._bookkeeping(self._lengths[start:stop], self._ids[start:stop])  # the rows' lengths and ids, shared
        return view

    def nbytes(self) -> int:
        return 2 * len(self._buffers[0]) * int(np.prod(self._shape)) * self._dtype.itemsize

    def bind_kv(self, binding: ort.IOBinding, past: list[tuple[str, str]], present: list[tuple[str, str]]) -> None:
        """Bind each layer's buffer (this view's rows of it) as past and present, by device address."""
        row_bytes = int(np.prod(self._shape[1:])) * self._dtype.itemsize
        for i, ((pk, pv), (ok, ov)) in enumerate(zip(past, present)):
            for name_in, name_out, value in ((pk, ok, self._buffers[0][i]), (pv, ov, self._buffers[1][i])):
                address = value.data_ptr() + self._first_row * row_bytes
                binding.bind_input(name_in, self.device, self.device_id, self._dtype, list(self._shape), address)
                binding.bind_output(name_out, self.device, self.device_id, self._dtype, list(self._shape), address)

    def device_values(self) -> list[ort.OrtValue]:
        """Every buffer (keys then values), for checks that they stay where they are."""
        return self._buffers[0] + self._buffers[1]
