"""`--lm-head rescore` (quantize/rescore.py): the lm_head scans a 4-bit copy of the vocabulary and the
scan's best candidates get their logits recomputed from the 8-bit table.

Checked against an int8-head export of the same checkpoint in the same run, both at accuracy level 0
(float activations, so the int8 head computes exactly what the rescoring recomputes, up to summation
order): every row's candidates carry the int8 head's logits, the rest carry the scan's (visibly
different), and greedy picks the same token.
"""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import edge_infer
from edge_infer.cli import main
from edge_infer.contract.errors import UserError
from edge_infer.quantize import rescore
from edge_infer.quantize.config import QuantConfig
from edge_infer.quantize.rewrite import quantize_graph

IDS = [5, 17, 42, 99, 7, 250, 31, 8, 140, 33, 6, 201]


def all_logits(folder) -> np.ndarray:
    m = edge_infer.load(folder, device="cpu", threads=2)
    return m.forward(np.array([IDS]), m.new_cache(), logits_to_keep=len(IDS))[0]  # (positions, vocab)


def ops(folder) -> set[str]:
    return {n.op_type for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node}


@pytest.mark.parametrize("kind", ["llama", "gemma2"])  # untied lm_head; tied to the embeddings, soft-capped
def test_candidates_carry_the_8_bit_logits_and_the_tail_the_scan(tiny_exports, kind):
    int8 = tiny_exports(kind, "int4", accuracy_level=0)  # a 360-token vocabulary: auto is int8
    rescored = tiny_exports(kind, "int4", accuracy_level=0, lm_head="rescore")
    assert json.loads((int8 / "manifest.json").read_text())["quantization"]["lm_head"] == "int8"
    assert json.loads((rescored / "manifest.json").read_text())["quantization"]["lm_head"] == "rescore"
    assert {"TopK", "GatherBlockQuantized", "ScatterElements"} <= ops(rescored)
    assert "TopK" not in ops(int8)

    a, b = all_logits(int8), all_logits(rescored)
    c = rescore.candidates(a.shape[-1])
    assert 0 < c < a.shape[-1]
    same = np.abs(a - b) <= 1e-4 * np.abs(a).max()
    assert (same.sum(-1) >= c).all(), same.sum(-1)  # every row: at least its C candidates are the int8 head's
    assert (~same).sum(-1).min() > 0  # and the tail really is the 4-bit scan's
    assert (np.argmax(a, -1) == np.argmax(b, -1)).all()
    winners = np.take_along_axis(same, np.argmax(a, -1)[:, None], -1)
    assert winners.all()  # the winning logit itself is the int8 head's


def test_auto_rescores_large_vocabularies_only():
    config = QuantConfig.from_options("int4")
    assert config.lm_head == "auto"
    assert config.for_vocab(151936, tied=True).lm_head == "rescore"
    assert config.for_vocab(151936, tied=False).lm_head == "rescore"
    assert config.for_vocab(49152, tied=True).lm_head == "int8"  # SmolLM2: the head is a small part of a step
    # A tied head shares the embeddings' table: it follows a non-int8 embedding choice.
    assert QuantConfig.from_options("int4", embeddings="int4").for_vocab(151936, tied=True).lm_head == "int4"
    assert QuantConfig.from_options("int4", embeddings="int4").for_vocab(151936, tied=False).lm_head == "rescore"
    assert rescore.candidates(151936) == rescore.MAX_CANDIDATES and rescore.candidates(360) == 45


def test_the_scan_stored_in_row_slices_gives_the_same_logits(tiny_exports, tmp_path, monkeypatch):
    fp32 = tiny_exports("llama", "fp32")

    def rescored(out):
        result = CliRunner().invoke(main, ["quantize", str(fp32), "-o", str(out), "--lm-head", "rescore", "-q"],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return onnx.load(str(out / "model.onnx"), load_external_data=False).graph

    def scans(graph):
        return [n for n in graph.node if n.op_type == "MatMulNBits" and n.name.startswith("/lm_head/scan")]

    whole_graph = rescored(tmp_path / "whole")
    (whole,) = scans(whole_graph)
    inits = {t.name: t for t in whole_graph.initializer}
    vocab, n_blocks, blob = inits[whole.input[1]].dims
    assert vocab == 360
    monkeypatch.setattr(rescore, "SCAN_PART_BYTES", 128 * n_blocks * blob)  # slices of 128, 128 and 104 rows
    graph = rescored(tmp_path / "sliced")
    parts = scans(graph)
    assert [next(a.i for a in n.attribute if a.name == "N") for n in parts] == [128, 128, 104]
    assert any(n.op_type == "Concat" and n.output[0] == whole.output[0] for n in graph.node)
    np.testing.assert_array_equal(all_logits(tmp_path / "whole"), all_logits(tmp_path / "sliced"))


def test_scan_parts_cover_the_rows_within_the_limit_at_aligned_starts(monkeypatch):
    align = rescore.SCAN_ROW_ALIGN
    monkeypatch.setattr(rescore, "SCAN_PART_BYTES", 10_000)
    for rows, row_bytes in ((151936, 768), (360, 16), (7, 1000), (1, 10), (128, 78)):
        parts = rescore.scan_parts(rows, row_bytes)
        assert parts[0][0] == 0 and parts[-1][1] == rows
        assert all(a[1] == b[0] and b[0] % align == 0 for a, b in zip(parts, parts[1:]))
        assert all((stop - start) * row_bytes <= max(10_000, align * row_bytes) for start, stop in parts)
        assert all((stop - start + align) * row_bytes > 10_000 for start, stop in parts[:-1])  # as few as fit
    monkeypatch.undo()
    assert len(rescore.scan_parts(151936, 768)) == 4  # the 1.5B scan: 117 MB in slices of 32 MiB


def test_a_tied_rescore_needs_int8_embeddings(tiny_exports):
    fp32 = tiny_exports("gemma2", "fp32")
    model = onnx.load(str(fp32 / "model.onnx"))
    with pytest.raises(UserError, match="embeddings int8"):
        quantize_graph(model, QuantConfig.from_options("int4", embeddings="int4", lm_head="rescore"))


def test_quantize_command_records_the_decided_head(tiny_exports, tmp_path):
    fp32 = tiny_exports("llama", "fp32")
    for head, recorded in (("auto", "int8"), ("rescore", "rescore")):
        out = tmp_path / head
        result = CliRunner().invoke(main, ["quantize", str(fp32), "-o", str(out), "--lm-head", head, "-q"],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert json.loads((out / "manifest.json").read_text())["quantization"]["lm_head"] == recorded
    a, b = all_logits(tmp_path / "auto"), all_logits(tmp_path / "rescore")
    assert (np.argmax(a, -1) == np.argmax(b, -1)).mean() >= 0.9  # int8 activations on both: near, not equal
