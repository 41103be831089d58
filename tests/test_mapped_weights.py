"""runtime/mapped_weights.py: the pages of the weights file that onnxruntime keeps mapped after packing are
handed back at load, only where no page was written, and the logits do not change."""

import mmap
import os
import sys
from pathlib import Path

import numpy as np
import pytest

import edge_infer
from edge_infer.runtime import mapped_weights

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps (Linux)")
PAGE = mmap.PAGESIZE


def resident_kb(path: Path, start: int | None = None) -> int:
    """Rss of this process's mappings of `path` (of the one at `start` if given), from /proc/self/smaps."""
    found = mapped_weights.private_mappings(Path("/proc/self/smaps").read_text())
    real = os.path.realpath(path)
    return sum(m.rss_kb for m in found if m.path == real and (start is None or m.start == start))


def address(view: mmap.mmap) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def test_a_clean_private_mapping_is_dropped_and_reads_back_the_same(tmp_path):
    f = tmp_path / "weights.bin"
    data = np.random.default_rng(0).integers(0, 256, 64 * PAGE, dtype=np.uint8).tobytes()
    f.write_bytes(data)
    with open(f, "rb") as fh:  # MAP_PRIVATE, readable and writable: the mapping onnxruntime makes ("rw-p")
        view = mmap.mmap(fh.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        assert bytes(view) == data  # every page read: resident
        start = address(view)
        assert resident_kb(f, start) >= 64 * PAGE // 1024
        assert mapped_weights.release([f]) >= 64 * PAGE
        assert resident_kb(f, start) == 0
        assert bytes(view) == data  # faulted back in from the file, unchanged
    finally:
        view.close()


def test_a_mapping_with_a_written_page_is_left_alone(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(bytes(16 * PAGE))
    with open(f, "rb") as fh:
        view = mmap.mmap(fh.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        bytes(view)
        view[5 * PAGE] = 7  # a private copy of one page: dropping it would lose the write
        start = address(view)
        before = resident_kb(f, start)
        assert mapped_weights.release([f]) == 0
        assert resident_kb(f, start) == before
        assert view[5 * PAGE] == 7 and f.read_bytes()[5 * PAGE] == 0
    finally:
        view.close()


def test_other_files_and_missing_proc_are_no_ops(tmp_path, monkeypatch):
    assert mapped_weights.release([tmp_path / "nothing-maps-this"]) == 0
    monkeypatch.setattr(mapped_weights, "SMAPS", str(tmp_path / "no-such-smaps"))
    assert mapped_weights.release([tmp_path / "nothing-maps-this"]) == 0


def test_smaps_lines_are_read_per_mapping():
    text = "\n".join([
        "7f0000000000-7f0000004000 rw-p 00001000 fe:00 12    /models/a b/model.onnx.data",
        "Size:                 16 kB",
        "Rss:                  12 kB",
        "Anonymous:             4 kB",
        "VmFlags: rd wr mr mw me ac sd",
        "7f0000004000-7f0000008000 r--s 00000000 fe:00 13    /models/shared.bin",  # shared: not ours to drop
        "Rss:                  16 kB",
        "7f0000008000-7f000000a000 rw-p 00000000 00:00 0 ",  # anonymous memory
        "Rss:                   8 kB",
        "Anonymous:             8 kB",
    ])
    (m,) = mapped_weights.private_mappings(text)
    assert (m.start, m.end, m.path, m.rss_kb, m.anonymous_kb) == (
        0x7F0000000000, 0x7F0000004000, "/models/a b/model.onnx.data", 12, 4)


def test_a_loaded_model_holds_no_weight_pages_it_does_not_read(tiny_exports, monkeypatch):
    folder = tiny_exports("llama", "int4")
    data = folder / "model.onnx.data"
    ids = np.array([[5, 17, 42, 99, 7, 250, 31, 8]])
    with monkeypatch.context() as patch:  # the same model with every page kept: the reference logits
        patch.setattr(mapped_weights, "release", lambda files: 0)
        kept = edge_infer.load(folder, device="cpu", threads=2)
        reference = kept.forward(ids, kept.new_cache(), logits_to_keep=ids.shape[1])
        assert resident_kb(data) > 0
        del kept
    m = edge_infer.load(folder, device="cpu", threads=2)
    assert m.released_bytes > 0  # the packing read the scales, and load handed their pages back
    assert resident_kb(data) * 1024 < m.released_bytes
    first = m.forward(ids, m.new_cache(), logits_to_keep=ids.shape[1])
    np.testing.assert_array_equal(first, reference)
    mapped_weights.release([data])  # again, after the pass faulted in what it reads
    again = m.forward(ids, m.new_cache(), logits_to_keep=ids.shape[1])
    np.testing.assert_array_equal(first, again)
