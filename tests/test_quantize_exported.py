"""`edge-infer quantize` of an exported fp32 folder (export/quantize_exported.py): the quantized folder's
logits against the fp32 folder's, in the same run.

The two folders' data files share one name (model.onnx.data); a tensor the quantizer leaves as it is
(the rotary caches, float embeddings) must be copied into the new file, not kept at the source's
offsets (which once read other weights' bytes: NaN logits).
"""

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

import edge_infer
from edge_infer.cli import main

IDS = np.array([[5, 17, 42, 99, 7, 250, 31, 8]])


@pytest.mark.parametrize("quant, extra, floor", [
    ("int4", (), 0.9),  # random tiny weights are hard on int4 (tests/test_export.py uses the same floors)
    ("int8", (), 0.99),
    ("int4", ("--embeddings", "fp", "--lm-head", "fp"), 0.9),  # large float tensors left as they are
])
def test_quantized_folder_logits_follow_the_fp32_folder(tiny_exports, tmp_path, quant, extra, floor):
    fp32 = tiny_exports("llama", "fp32")
    out = tmp_path / quant
    result = CliRunner().invoke(main, ["quantize", str(fp32), "-o", str(out), "--quant", quant, *extra, "-q"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    validation = json.loads((out / "manifest.json").read_text())["validation"]
    assert math.isfinite(validation["mean_kl"]) and validation["top1_agreement"] > 0, validation
    ref, q = (edge_infer.load(f, device="cpu", threads=1) for f in (fp32, out))
    a = ref.forward(IDS, ref.new_cache(), logits_to_keep=IDS.shape[1])[0]  # (8, vocab)
    b = q.forward(IDS, q.new_cache(), logits_to_keep=IDS.shape[1])[0]
    assert np.isfinite(b).all()
    assert 0 < np.abs(a - b).max() and np.corrcoef(a.ravel(), b.ravel())[0, 1] > floor
