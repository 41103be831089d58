"""Graph headers chosen by the installed onnxruntime, and the cache that builds every pass.

onnxruntime 1.32 is installed here, so the header for older releases (model.compat.onnx, no
query_seqlens) is chosen by telling the capability probe that GroupQueryAttention lacks the input;
tests/test_ort_floor.py runs the same folders under onnxruntime 1.24.4 and 1.31.1 themselves.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from ort_floor_probe import run

import edge_infer
from edge_infer.contract.errors import ContextLengthError, ModelFileError
from edge_infer.contract.io_names import ATTENTION_INPUTS, QUERY_SEQLENS
from edge_infer.contract.model_folder import COMPAT_GRAPH_FILE, GRAPH_FILE
from edge_infer.devices import capabilities
from edge_infer.runtime.cache import reusable


def older_runtime(monkeypatch, knows: tuple[str, ...]) -> None:
    """The capability probe answers as an onnxruntime whose GroupQueryAttention has only `knows` inputs."""
    monkeypatch.setattr(capabilities, "knows_attention_input", lambda name: name in knows)


ORT_1_24 = ATTENTION_INPUTS[:ATTENTION_INPUTS.index("head_sink") + 1]


@pytest.fixture(scope="module")
def folder(tiny_exports):
    return tiny_exports("llama", "int4")


def test_the_header_for_older_releases_runs_like_the_full_graph(folder, monkeypatch):
    full = run(str(folder))
    older_runtime(monkeypatch, ORT_1_24)
    compat = run(str(folder))
    assert full["header"] == GRAPH_FILE and full["ragged_rows"]
    assert compat["header"] == COMPAT_GRAPH_FILE and not compat["ragged_rows"]
    assert "1.32" in compat["graph"] and "without speculation" in compat["graph"]
    assert compat["ids"] == full["ids"]  # batch 1: speculation on, exact
    assert compat["together"]["ids"] == full["together"]["ids"]  # two rows side by side, one id per row
    assert full["batched_row_is_one_pass"] and compat["batched_row_is_one_pass"]  # wide rows run alone


def test_the_compat_header_feeds_only_what_older_releases_know(folder):
    graph = onnx.load(str(folder / COMPAT_GRAPH_FILE), load_external_data=False)
    attention = [n for n in graph.graph.node if n.op_type == "GroupQueryAttention"]
    assert attention and all(len(n.input) <= len(ORT_1_24) for n in attention)
    assert QUERY_SEQLENS not in {i.name for i in graph.graph.input}
    headers = json.loads((folder / "manifest.json").read_text())["graph"]["headers"]
    assert [h["file"] for h in headers] == [GRAPH_FILE, COMPAT_GRAPH_FILE]
    assert QUERY_SEQLENS in headers[0]["needs"] and QUERY_SEQLENS not in headers[1]["needs"]


def test_no_header_that_loads_is_one_clear_error(folder, monkeypatch):
    older_runtime(monkeypatch, ATTENTION_INPUTS[:7])  # not even the rotary caches
    with pytest.raises(ModelFileError, match="no graph of this model loads on onnxruntime .*cos_cache"):
        edge_infer.load(folder, device="cpu", threads=1)


def test_a_folder_of_the_previous_format_says_re_export(folder, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    raw = json.loads((old / "manifest.json").read_text())
    raw["format_version"] = 1
    (old / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ModelFileError, match=r"older edge-infer \(format version 1.*re-export the model"):
        edge_infer.load(old, device="cpu", threads=1)


def test_the_cache_owns_row_lengths_and_builds_the_pass(folder):
    m = edge_infer.load(folder, device="cpu", threads=1)
    cache = m.new_cache(batch=3, max_length=8)
    cache.row(1).advance_rows([[4, 5]])  # a slot's view moves the parent's row
    view = cache.rows(1, 3)
    assert cache.lengths.tolist() == [0, 2, 0] and view.lengths.tolist() == [2, 0]
    assert view.row(0).tokens == [4, 5]
    p = cache.plan([[7], [8, 9], []], pad=False, uniform=False)
    assert p.ids.tolist() == [[7, 0], [8, 9], [0, 0]]
    assert p.query_lengths.tolist() == [1, 2, 0]
    assert p.mask.tolist() == [[1, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]  # an idle row still shows one position
    assert p.positions.tolist() == [[0, 1], [2, 3], [0, 1]]
    uniform = cache.plan([[7], [8, 9], []], pad=False, uniform=True)
    assert uniform.query_lengths.tolist() == [2, 2, 2]
    with pytest.raises(ContextLengthError, match="9 positions do not fit the KV cache of 8"):
        cache.plan([[1], [1] * 7, []], pad=False, uniform=False)
    rows = m.forward_rows([[7], [8, 9], []], cache)
    assert [r.shape[0] for r in rows] == [1, 2, 0] and cache.lengths.tolist() == [1, 4, 0]  # each row by its feed
    assert cache.row(1).tokens == [4, 5, 8, 9]
    np.testing.assert_array_equal(rows[0][0], m.forward(np.array([[7]]), m.new_cache())[0, 0])


def test_one_prefix_reuse_rule():
    assert reusable([1, 2, 3], [1, 2, 3]) == 2  # one id must run to give the next logits
    assert reusable([1, 2], [1, 2, 5, 6]) == 2
    assert reusable([1, 9, 3], [1, 2, 3]) == 1
    assert reusable([], [4]) == 0
