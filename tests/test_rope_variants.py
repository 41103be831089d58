"""Rope variants on both routes (Hugging Face folder and GGUF), each against transformers on a
tiny model: Llama 3 scaling (config; rope_freqs.weight in the GGUF), linear, YaRN, LongRoPE
(short factors when the exported context fits the original one, long factors past it, as
llama.cpp chooses) and partial rotary."""

import numpy as np
import pytest
import torch

import edge_infer
from edge_infer.export.export_folder import ExportOptions, export_model
from gguf_convert import write_gguf
from tiny import hf_greedy, load_reference, make_checkpoint, our_greedy

TOL = 1e-3
LONGROPE = dict(max_position_embeddings=256, original_max_position_embeddings=64,
                rope_scaling={"type": "longrope", "long_factor": [1.0 + 0.5 * i for i in range(8)],
                              "short_factor": [1.0 + 0.1 * i for i in range(8)]})
VARIANTS = {  # name -> (family, config overrides, exported max_length, prompt length)
    "llama3": ("llama", {}, 128, 12),
    "linear": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 3.0}}, 128, 12),
    "yarn": ("qwen2", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}},
             128, 12),
    "longrope_short": ("phi3", LONGROPE, 64, 12),
    "longrope_long": ("phi3", LONGROPE, 128, 70),
    "partial_rotary": ("phi3", dict(partial_rotary_factor=0.5, head_dim=32, num_attention_heads=2,
                                    num_key_value_heads=1), 128, 12),
}


def check(ref, model, prompt, name):
    with torch.no_grad():
        expected = ref(torch.tensor([prompt])).logits[0].numpy()  # (sequence_length, vocab)
    ours = model.forward(np.array([prompt]), model.new_cache(), logits_to_keep=len(prompt))[0]
    np.testing.assert_allclose(ours, expected, atol=TOL, rtol=0, err_msg=name)
    cache = model.new_cache()
    split = len(prompt) - 6
    model.forward(np.array([prompt[:split]]), cache)
    for t in range(split, len(prompt)):
        step = model.forward(np.array([[prompt[t]]]), cache)[0, -1]
        np.testing.assert_allclose(step, expected[t], atol=TOL, rtol=0, err_msg=f"{name} step {t}")
    assert our_greedy(model, prompt, 32) == hf_greedy(ref, prompt, 32), name


@pytest.mark.parametrize("route", ["hf", "gguf"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_rope_variant(name, route, tmp_path):
    family, over, max_length, n = VARIANTS[name]
    folder = make_checkpoint(family, tmp_path / "hf", **over)
    ref = load_reference(folder)
    src = folder if route == "hf" else write_gguf(family, ref, tmp_path / f"{family}.gguf")
    out = export_model(src, tmp_path / "out", ExportOptions(quant="fp32", max_length=max_length, validate=False))
    prompt = [int(x) for x in np.random.default_rng(3).integers(3, 350, n)]
    check(ref, edge_infer.load(out, device="cpu"), prompt, f"{name} ({route})")


def test_rotary_dimension_groupqueryattention_cannot_take_is_refused(tmp_path):
    from edge_infer.contract.errors import ModelFileError

    folder = make_checkpoint("phi3", tmp_path / "hf", partial_rotary_factor=0.5)  # head dim 16: rotary 8
    with pytest.raises(ModelFileError, match="rotary dimension 8 .head dim 16. is not supported"):
        export_model(folder, tmp_path / "out", ExportOptions(quant="fp32", max_length=64, validate=False))
    assert not (tmp_path / "out").exists()
