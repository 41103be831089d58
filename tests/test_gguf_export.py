"""Exporting a GGUF: quantized blocks reach MatMulNBits without a second rounding."""

import json

import gguf
import numpy as np
import onnx
import pytest
from gguf.constants import GGMLQuantizationType as QT

import edge_infer
from edge_infer.export.export_folder import ExportOptions, export_model
from tiny import CHATML, make_tokenizer

RNG = np.random.default_rng(1)
HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 64, 4, 2, 96, 2


from gguf_convert import F16_FIELDS  # noqa: E402  (byte offsets of each block's f16 scales)


def kquant_bytes(shape, qtype: QT) -> np.ndarray:
    """Random but valid K-quant blocks (gguf cannot quantize to K-quants): random bytes, small f16 scales."""
    from gguf.constants import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    n, k = shape
    raw = RNG.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    for pos in F16_FIELDS[qtype]:
        scales = RNG.uniform(0.0005, 0.004, (n, k // block)).astype(np.float16)
        raw[..., pos:pos + 2] = scales.view(np.uint8).reshape(n, k // block, 2)
    return raw.reshape(n, -1)


def write_llama_gguf(path, types: dict[str, QT], hidden=64, ffn=96):
    """A tiny llama GGUF with a byte-level BPE vocabulary and mixed tensor types."""
    HIDDEN, FFN = hidden, ffn
    tok = make_tokenizer()
    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    specials = {t.content for t in tok.get_added_tokens_decoder().values()}
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in {"block_count": LAYERS, "context_length": 256, "embedding_length": HIDDEN,
                       "feed_forward_length": FFN, "attention.head_count": HEADS,
                       "attention.head_count_kv": KV_HEADS}.items():
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "gpt2")
    w.add_array("tokenizer.ggml.tokens", [t for t, _ in vocab])
    w.add_array("tokenizer.ggml.token_type", [3 if t in specials else 1 for t, _ in vocab])
    w.add_array("tokenizer.ggml.merges", merges)
    w.add_uint32("tokenizer.ggml.bos_token_id", 0)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    w.add_string("tokenizer.chat_template", CHATML)
    shapes = {"token_embd.weight": (len(vocab), HIDDEN), "output_norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        b = f"blk.{i}."
        shapes.update({b + "attn_norm.weight": (HIDDEN,), b + "ffn_norm.weight": (HIDDEN,),
                       b + "attn_q.weight": (HIDDEN, HIDDEN), b + "attn_k.weight": (KV_HEADS * HIDDEN // HEADS, HIDDEN),
                       b + "attn_v.weight": (KV_HEADS * HIDDEN // HEADS, HIDDEN), b + "attn_output.weight": (HIDDEN, HIDDEN),
                       b + "ffn_gate.weight": (FFN, HIDDEN), b + "ffn_up.weight": (FFN, HIDDEN),
                       b + "ffn_down.weight": (HIDDEN, FFN)})
    for name, shape in shapes.items():
        data = RNG.normal(0, 0.3, shape).astype(np.float32) if len(shape) == 2 else RNG.uniform(0.5, 1.5, shape).astype(np.float32)
        qtype = QT.F32 if len(shape) == 1 else types.get(name.split(".")[-2], QT.Q4_1)
        if qtype in F16_FIELDS:
            w.add_tensor(name, kquant_bytes(shape, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    # Q4_1 for most weights, Q4_0 for attention output, Q8_0 for the embedding: all three block kinds.
    return write_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf",
                            {"attn_output": QT.Q4_0, "token_embd": QT.Q8_0})


def test_imported_blocks_compute_the_gguf_weights(gguf_file, tmp_path):
    """int4 (float activations) equals the fp32 export of the dequantized GGUF up to float rounding."""
    fp32 = export_model(gguf_file, tmp_path / "fp32", ExportOptions(quant="fp32", max_length=64, validate=False))
    int4 = export_model(gguf_file, tmp_path / "int4", ExportOptions(quant="int4", max_length=64, accuracy_level=0,
                                                                   gguf_import="exact"))
    manifest = json.loads((int4 / "manifest.json").read_text())
    assert manifest["quantization"]["summary"]["requantized"] == []
    assert "imported exactly" in manifest["quantization"]["gguf_q4_1"]
    a, b = edge_infer.load(fp32, device="cpu"), edge_infer.load(int4, device="cpu")
    ids = np.array([[5, 17, 42, 99, 7, 250, 31, 8, 64, 120]])
    la = a.forward(ids, a.new_cache(), logits_to_keep=10)[0]
    lb = b.forward(ids, b.new_cache(), logits_to_keep=10)[0]
    np.testing.assert_allclose(lb, la, atol=2e-4 * np.abs(la).max())
    assert (la.argmax(-1) == lb.argmax(-1)).all()


def test_block_16_split_is_exact_too(gguf_file, tmp_path):
    int4 = export_model(gguf_file, tmp_path / "b16", ExportOptions(quant="int4", max_length=64, block_size=16,
                                                                 accuracy_level=0, validate=False,
                                                                 gguf_import="exact"))
    fp32 = export_model(gguf_file, tmp_path / "fp32", ExportOptions(quant="fp32", max_length=64, validate=False))
    a, b = edge_infer.load(fp32, device="cpu"), edge_infer.load(int4, device="cpu")
    ids = np.array([[3, 4, 5, 6, 7, 8]])
    la = a.forward(ids, a.new_cache(), logits_to_keep=6)[0]
    lb = b.forward(ids, b.new_cache(), logits_to_keep=6)[0]
    np.testing.assert_allclose(lb, la, atol=2e-4 * np.abs(la).max())


def test_gguf_import_modes(gguf_file, tmp_path):
    """--gguf-import: exact keeps a float residual branch for every Q4_1 weight, mixed only in the
    MLP, folded and requantize for none (requantize can take the Q8_0 embedding down to int4);
    folded feeds those weights [x, blocksum(x)] instead. The rounded weights stay close to the
    GGUF's own: folded next to exact, far below mixed and requantize."""
    import onnx

    opts = dict(quant="int4", max_length=64, accuracy_level=0, validate=False)
    modes = ("exact", "folded", "mixed", "requantize")
    out = {mode: export_model(gguf_file, tmp_path / mode, ExportOptions(**opts, gguf_import=mode)) for mode in modes}
    fast4 = export_model(gguf_file, tmp_path / "fast4", ExportOptions(**opts, gguf_import="requantize",
                                                                     embeddings="int4", lm_head="int4"))
    graphs = {mode: onnx.load(f / "model.onnx").graph for mode, f in out.items()}
    residuals = {mode: [n.name for n in g.node if n.op_type == "MatMul" and "/block_min/" in n.name]
                 for mode, g in graphs.items()}  # the exact import's float residual terms
    assert len(residuals["exact"]) == 3 * LAYERS  # qkv and gate_up and down are Q4_1 (o is Q4_0: no residual)
    assert residuals["mixed"] and all("/mlp/" in name for name in residuals["mixed"])
    assert len(residuals["mixed"]) == 2 * LAYERS and residuals["requantize"] == residuals["folded"] == []
    widened = {n.name: [a.i for a in n.attribute if a.name == "K"][0] for n in graphs["folded"].node
               if n.op_type == "MatMulNBits" and n.input[0].endswith("/x_and_sums")}
    assert len(widened) == 3 * LAYERS and sorted(set(widened.values())) == [HIDDEN + 2 * 32, FFN + 2 * 32]  # [x, sums, sums]
    sums = [n for n in graphs["folded"].node if n.name.endswith("/block_sums/MatMul")]
    assert len(sums) == 3 * LAYERS and len({n.input[1] for n in sums}) == 2  # one 0/1 matrix per K
    for mode, f in out.items():
        q = json.loads((f / "manifest.json").read_text())["quantization"]
        assert q["gguf_import"] == mode
        assert ("gguf_q4_1" in q) == (mode in ("exact", "mixed")) and ("gguf_q4_1_folded" in q) == (mode == "folded")
    folded4 = export_model(gguf_file, tmp_path / "folded4", ExportOptions(**opts, gguf_import="folded",
                                                                         embeddings="int4", lm_head="int4"))
    for f in (fast4, folded4):  # asked for by name, so the Q8_0 table is rounded to 4 bits, not kept at 8
        heads = [n for n in onnx.load(f / "model.onnx").graph.node if n.name.startswith("/lm_head/MatMul")]
        assert [a.i for n in heads for a in n.attribute if a.name == "bits"] == [4], f.name
        q = json.loads((f / "manifest.json").read_text())["quantization"]
        assert q["lm_head"] == q["embeddings"] == "int4", f.name
    fp32 = edge_infer.load(export_model(gguf_file, tmp_path / "fp32", ExportOptions(quant="fp32", max_length=64,
                                                                                   validate=False)), device="cpu")
    ids = np.array([[5, 17, 42, 99, 7, 250, 31, 8, 64, 120]])
    la = fp32.forward(ids, fp32.new_cache(), logits_to_keep=10)[0]
    err = {}
    for mode, f in out.items():
        m = edge_infer.load(f, device="cpu")
        lb = m.forward(ids, m.new_cache(), logits_to_keep=10)[0]
        err[mode] = np.abs(lb - la).mean() / np.abs(la).mean()
    assert err["exact"] < 1e-4 and err["folded"] < 2e-4 < err["mixed"] / 10  # random weights: the worst case
    assert err["mixed"] < err["requantize"] < 0.3


def test_folded_residuals_are_within_their_bound(gguf_file):
    """fold_minimum's weights are split_minimum's exact ones plus two residual parts (rounded, and
    what that rounding left, rounded again) whose sum differs from the exact residuals by at most
    half a step of the second part's blocks, <= max(d) / 450."""
    from edge_infer.export.gguf_file import read_gguf
    from edge_infer.quantize.block_offsets import fold_minimum, split_minimum
    from edge_infer.quantize.nbits import dequantize

    ql = read_gguf(gguf_file).tensors["blk.0.ffn_up.weight"].blocks()
    base, residuals = split_minimum(ql)
    folded = fold_minimum(ql)
    n_blocks, p = residuals.shape[1], 32  # HIDDEN / 32 sums, padded to one block
    assert folded.k == base.k + 2 * p and folded.bits == 4
    w = dequantize(folded)  # (N, K + 2 P)
    np.testing.assert_array_equal(w[:, :base.k], dequantize(base))
    hi, lo = w[:, base.k:base.k + n_blocks], w[:, base.k + p:base.k + p + n_blocks]
    assert not w[:, base.k + n_blocks:base.k + p].any() and not w[:, base.k + p + n_blocks:].any()  # padding
    err = np.abs(hi + lo - residuals)
    assert err.max() <= np.abs(ql.scales).max() / 450 + 1e-7
    assert np.abs(hi - residuals).max() > 10 * err.max()  # the second part is what makes it that close


def test_gguf_tokenizer_and_template_travel_with_the_export(gguf_file, tmp_path):
    out = export_model(gguf_file, tmp_path / "m", ExportOptions(quant="int8", max_length=64, validate=False))
    m = edge_infer.load(out, device="cpu")
    ref = make_tokenizer()
    text = "The quick brown fox, 日本語 and 🙂"
    assert m.tokenizer.encode(text) == ref.encode(text).ids
    assert m.chat_template is not None and m.tokenizer.eos_ids == {2}


def test_k_quants_are_imported_exactly(tmp_path):
    """Q4_K (4-bit blocks of 32 with minimums) and Q6_K (kept 8-bit, blocks of 16) compute the GGUF's weights."""
    path = write_llama_gguf(tmp_path / "k.gguf", {"attn_q": QT.Q4_K, "attn_k": QT.Q4_K, "attn_v": QT.Q4_K,
                                                  "attn_output": QT.Q6_K, "ffn_gate": QT.Q4_K, "ffn_up": QT.Q4_K,
                                                  "ffn_down": QT.Q6_K, "token_embd": QT.Q8_0}, hidden=256, ffn=256)
    fp32 = export_model(path, tmp_path / "fp32", ExportOptions(quant="fp32", max_length=64, validate=False))
    int4 = export_model(path, tmp_path / "int4", ExportOptions(quant="int4", max_length=64, accuracy_level=0,
                                                              gguf_import="exact"))
    q = json.loads((int4 / "manifest.json").read_text())["quantization"]
    assert q["summary"]["requantized"] == [] and q["summary"]["quantized_by_bits"].get("8", 0) == 5
    a, b = edge_infer.load(fp32, device="cpu"), edge_infer.load(int4, device="cpu")
    ids = np.array([[5, 17, 42, 99, 7, 250, 31, 8]])
    la = a.forward(ids, a.new_cache(), logits_to_keep=8)[0]
    lb = b.forward(ids, b.new_cache(), logits_to_keep=8)[0]
    np.testing.assert_allclose(lb, la, atol=2e-4 * np.abs(la).max())


def test_fused_weights_of_mixed_source_types_are_recorded(tmp_path):
    """q/k/v fuse into one MatMul: Q4_K q with Q6_K v cannot stay exact, and the manifest says so."""
    path = write_llama_gguf(tmp_path / "m.gguf", {"attn_q": QT.Q4_K, "attn_k": QT.Q4_K, "attn_v": QT.Q6_K,
                                                  "ffn_gate": QT.Q4_K, "ffn_up": QT.Q4_K, "attn_output": QT.Q4_K,
                                                  "ffn_down": QT.Q4_K}, hidden=256, ffn=256)
    int4 = export_model(path, tmp_path / "int4", ExportOptions(quant="int4", max_length=64, validate=False))
    q = json.loads((int4 / "manifest.json").read_text())["quantization"]
    assert q["mixed_source_types"] == ["layers.0.qkv.weight", "layers.1.qkv.weight"]


def test_default_import_widens_8bit_blocks_within_half_a_step(tmp_path):
    """`--gguf-import folded` (the default) rounds 8-bit blocks narrower than WIDE_8BIT_BLOCK (Q6_K's blocks
    of 16, Q5_0's of 32) again in 8-bit blocks of 64, which onnxruntime reads faster: every weight within half
    a step of its new block of the file's own value, the graph at block 64, the report and manifest saying so;
    `exact` keeps the file's blocks."""
    from edge_infer.export.gguf_file import read_gguf
    from edge_infer.export.graph import initializer_name
    from edge_infer.export.quantize_step import WIDE_8BIT_BLOCK, source_blocks
    from edge_infer.quantize.nbits import dequantize

    path = write_llama_gguf(tmp_path / "k.gguf", {"attn_q": QT.Q4_K, "attn_k": QT.Q4_K, "attn_v": QT.Q4_K,
                                                  "attn_output": QT.Q4_K, "ffn_gate": QT.Q5_0, "ffn_up": QT.Q5_0,
                                                  "ffn_down": QT.Q6_K, "token_embd": QT.Q8_0}, hidden=256, ffn=256)
    ql = read_gguf(path).tensors["blk.0.ffn_down.weight"].blocks()
    name = initializer_name("layers.0.down.weight")
    pre, _, _, widened = source_blocks({"layers.0.down.weight": ql}, 4, 8, 32)
    wide = pre[name]
    assert widened == {name} and (wide.bits, wide.block_size, ql.block_size) == (8, WIDE_8BIT_BLOCK, 16)
    err = np.abs(dequantize(wide) - dequantize(ql))
    half_step = np.repeat(np.abs(wide.scales), WIDE_8BIT_BLOCK, axis=1)[:, :ql.k] / 2
    assert (err <= half_step * (1 + 1e-4)).all() and err.max() > 0  # (float rounding of the step)
    exact, _, _, none = source_blocks({"layers.0.down.weight": ql}, 4, 8, 32, gguf_import="exact")
    assert not none and exact[name].block_size == 16

    out = export_model(path, tmp_path / "int4", ExportOptions(quant="int4", max_length=64, validate=False))
    q = json.loads((out / "manifest.json").read_text())["quantization"]
    assert q["gguf_tensors"]["tensors"]["layers.0.down.weight"] == "Q6_K: 8-bit blocks widened"
    assert q["gguf_tensors"]["tensors"]["layers.0.gate_up.weight"] == "Q5_0: 8-bit blocks widened"
    assert q["gguf_8bit_widened"].startswith(f"{2 * LAYERS} weights")  # down and gate_up of each layer
    # Kept as they are: qkv and o (Q4_K, residuals folded) and the Q8_0 embedding; not the widened ones.
    assert q["source_blocks"].startswith(f"{2 * LAYERS + 1} weights kept"), q["source_blocks"]
    graph = onnx.load(out / "model.onnx", load_external_data=False)
    blocks = {n.name: {a.name: a.i for a in n.attribute} for n in graph.graph.node if n.op_type == "MatMulNBits"}
    down = next(a for n, a in blocks.items() if "layers.0/mlp/down_proj" in n)
    assert (down["bits"], down["block_size"]) == (8, WIDE_8BIT_BLOCK)


def test_lean_import_rounds_only_the_6bit_blocks_to_the_exports_bits(tmp_path):
    """`--gguf-import lean`: as folded (Q4_K folded, Q5_0 widened to 8-bit blocks of 64, Q8_0 exact), but the Q6_K
    weight is left out of the source blocks, so it is rounded to 4 bits from the file's values; the report
    and manifest say which."""
    from edge_infer.export.gguf_file import read_gguf
    from edge_infer.export.graph import initializer_name
    from edge_infer.export.quantize_step import WIDE_8BIT_BLOCK, source_blocks

    path = write_llama_gguf(tmp_path / "k.gguf", {"attn_q": QT.Q4_K, "attn_k": QT.Q4_K, "attn_v": QT.Q4_K,
                                                  "attn_output": QT.Q4_K, "ffn_gate": QT.Q5_0, "ffn_up": QT.Q5_0,
                                                  "ffn_down": QT.Q6_K, "token_embd": QT.Q8_0}, hidden=256, ffn=256)
    tensors = read_gguf(path).tensors
    down = {"layers.0.down.weight": tensors["blk.0.ffn_down.weight"].blocks()}
    assert not source_blocks(down, 4, 8, 32, gguf_import="lean")[0]  # left out: rounded from float
    assert source_blocks(down, 4, 8, 32)[0]  # folded keeps it (widened)
    o = {"layers.0.o.weight": tensors["blk.0.attn_output.weight"].blocks()}
    pre, _, folded, _ = source_blocks(o, 4, 8, 32, gguf_import="lean")
    assert folded == {initializer_name("layers.0.o.weight")} and pre  # Q4_K folded as by default

    out = export_model(path, tmp_path / "lean", ExportOptions(quant="int4", max_length=64, validate=False,
                                                              gguf_import="lean"))
    q = json.loads((out / "manifest.json").read_text())["quantization"]
    assert q["gguf_import"] == "lean"
    kinds = q["gguf_tensors"]["tensors"]
    assert kinds["layers.0.down.weight"] == "Q6_K: dequantized once, quantized once"
    assert kinds["layers.0.gate_up.weight"] == "Q5_0: 8-bit blocks widened"
    assert kinds["layers.0.o.weight"] == "Q4_K: residuals folded"
    graph = onnx.load(out / "model.onnx", load_external_data=False)
    blocks = {n.name: {a.name: a.i for a in n.attribute} for n in graph.graph.node if n.op_type == "MatMulNBits"}
    for layer in range(LAYERS):
        node = next(a for n, a in blocks.items() if f"layers.{layer}/mlp/down_proj" in n)
        assert (node["bits"], node["block_size"]) == (4, 32)
    gate_up = next(a for n, a in blocks.items() if "layers.0/mlp/gate_up_proj" in n)
    assert (gate_up["bits"], gate_up["block_size"]) == (8, WIDE_8BIT_BLOCK)
