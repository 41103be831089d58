"""Issue 10, GGUF: one header integer cannot allocate the machine, a changed tensor type is refused,
geometry and context are range-checked. Each case runs the reader in a child under a 2 GiB cap."""

from __future__ import annotations

import struct

import pytest
from gguf.constants import GGMLQuantizationType as QT
from test_gguf_file import key_pos, patch, tensor_field, tiny_llama

from bounded import run_cases
from edge_infer.export.gguf_file import gguf_to_hf, read_gguf
from edge_infer.contract.errors import ModelFileError


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile") / "llama.gguf"
    tiny_llama(path.parent)
    return path, path.read_bytes()


def _u32(data: bytes, key: str, value: int) -> bytes:
    pos = key_pos(data, key)
    assert struct.unpack_from("<I", data, pos)[0] == 4  # UINT32
    return patch(data, pos + 4, "<I", value)


CASES = {  # case -> (patch, words the error must contain)
    "block_count 2**31-1": (lambda d: _u32(d, "llama.block_count", 2**31 - 1), "llama.block_count is 2147483647"),
    "block_count 200": (lambda d: _u32(d, "llama.block_count", 200), "file holds only 11 tensors"),
    "context_length 0": (lambda d: _u32(d, "llama.context_length", 0), "llama.context_length is 0, outside"),
    "context_length 3": (lambda d: _u32(d, "llama.context_length", 3), "llama.context_length is 3, outside"),
    "context_length 2**32-1": (lambda d: _u32(d, "llama.context_length", 2**32 - 1), "context_length is 4294967295"),
    "head_count_kv 3": (lambda d: _u32(d, "llama.attention.head_count_kv", 3), "inconsistent geometry"),
    "feed_forward 0": (lambda d: _u32(d, "llama.feed_forward_length", 0), "feed_forward_length is 0"),
    "norm F32 -> F16": (lambda d: patch(d, tensor_field(d, "blk.0.attn_norm.weight", "type"), "<I", QT.F16),
                        "its type, shape or offset was changed"),
    "q Q4_1 -> Q8_0": (lambda d: patch(d, tensor_field(d, "blk.0.attn_q.weight", "type"), "<I", QT.Q8_0),
                       "'blk.0.attn_q.weight'"),
    "embd Q4_1 -> type 40": (lambda d: patch(d, tensor_field(d, "token_embd.weight", "type"), "<I", 40),
                             "token_embd.weight"),
    "offset moved by one alignment": (lambda d: patch(d, tensor_field(d, "output_norm.weight", "offset"), "<Q",
                                      struct.unpack_from("<Q", d, tensor_field(d, "output_norm.weight",
                                                                                "offset"))[0] + 32),
                                      "'output_norm.weight'"),
    "bytes appended": (lambda d: d + bytes(64), "bytes unaccounted for"),
}


def test_hostile_headers_give_clean_errors_within_a_memory_cap(llama, tmp_path):
    path, data = llama
    cases = []
    for i, (name, (change, _)) in enumerate(CASES.items()):
        bad = tmp_path / f"case{i}.gguf"
        bad.write_bytes(change(data))
        cases.append((name, "gguf", str(bad)))
    results = run_cases(cases, timeout=120)
    for name, (_, words) in CASES.items():
        r = results[name]
        assert r.status == "clean" and words in r.message, (name, r)


def test_the_untouched_file_still_reads(llama):
    path, _ = llama
    config, weights, _ = gguf_to_hf(read_gguf(path))
    assert config["max_position_embeddings"] == 256 and len(weights) == 11


def test_a_changed_type_is_refused_in_process_too(llama, tmp_path):
    path, data = llama
    bad = tmp_path / "f16.gguf"
    bad.write_bytes(patch(data, tensor_field(data, "blk.0.attn_norm.weight", "type"), "<I", QT.F16))
    with pytest.raises(ModelFileError, match="blk.0.attn_norm.weight|was changed"):
        read_gguf(bad)
