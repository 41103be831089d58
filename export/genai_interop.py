"""Files that let onnxruntime-genai open an edge-infer model folder as it is.

`onnxruntime_genai.Model(folder)` reads `genai_config.json` (geometry, I/O names,
search defaults), the graph it names, and the tokenizer through `tokenizer.json`
plus `tokenizer_config.json`. Three things differ from what genai feeds:

  * our graph takes `logits_to_keep` (logits for the last positions only: the
    prefill speed path), which genai does not know. genai gets its own graph
    header, `model.genai.onnx`: the same nodes, with `logits_to_keep` a constant 0
    (the Slice then keeps every position, which is what genai expects at prefill).
    It points at the same external-data file, so the weights are stored once and
    our own graph keeps the input (an overridable initializer would have to be
    fed with `run`, and IOBinding refuses it).
  * `query_seqlens` (new tokens per row, for batched rows of different lengths) is
    computed in genai's header from the shape of `input_ids`: genai gives every row
    the same number.
  * genai's past and present share one buffer only when `past_present_share_buffer`
    is set; our graph is built for exactly that layout, so it is.

Only the direct route writes these (the optimum route's concat-KV graph is what
genai's own builder would write anyway); architectures genai has no model type
for are skipped with a note.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edge_infer.export.graph_headers import drop_input, query_seqlens_from_shape
from edge_infer.contract.io_names import (ATTENTION_MASK, INPUT_IDS, LOGITS, LOGITS_TO_KEEP, PAD_ATTENTION, POSITION_IDS,
                                          QUERY_SEQLENS, past, present)

GENAI_CONFIG = "genai_config.json"
GENAI_GRAPH = "model.genai.onnx"
TOKENIZER_CONFIG = "tokenizer_config.json"

# our model_type -> genai's "type" (decoder-only models genai 0.18 runs through its generic decoder)
GENAI_TYPES = {
    "llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
    "gemma2": "gemma2", "gemma3_text": "gemma3_text", "granite": "granite", "olmo": "olmo",
}


def genai_type(model_type: str) -> str | None:
    return GENAI_TYPES.get(model_type)


def write_genai_files(folder: Path, body: dict[str, Any], graph_file: str) -> str:
    """Write model.genai.onnx, genai_config.json and tokenizer_config.json into `folder`;
    returns one line for the export output and the manifest."""
    model, tok = body["model"], body["tokenizer"]
    kind = genai_type(model["architecture"])
    if kind is None:
        return f"not written: onnxruntime-genai has no model type for '{model['architecture']}'"
    inputs = body["graph"]["inputs"]
    _write_graph_without_keep(folder / graph_file, folder / GENAI_GRAPH)
    eos = list(tok["eos_token_ids"])
    pad = tok["pad_token_id"] if tok["pad_token_id"] is not None else (eos[0] if eos else 0)
    names = {"input_ids": INPUT_IDS, "attention_mask": ATTENTION_MASK,
             "past_key_names": past("%d", "key"), "past_value_names": past("%d", "value")}
    if POSITION_IDS in inputs:
        names.update(position_ids=POSITION_IDS)
    config = {
        "model": {
            "bos_token_id": tok["bos_token_id"] if tok["bos_token_id"] is not None else pad,
            "context_length": model["max_length"],
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": GENAI_GRAPH,
                "head_size": model["head_dim"], "hidden_size": model["hidden_size"],
                "num_attention_heads": model["num_heads"], "num_hidden_layers": model["num_layers"],
                "num_key_value_heads": model["num_kv_heads"],
                "inputs": names,
                "outputs": {"logits": LOGITS, "present_key_names": present("%d", "key"),
                            "present_value_names": present("%d", "value")},
            },
            "eos_token_id": eos if len(eos) != 1 else eos[0],
            "pad_token_id": pad,
            "type": kind,
            "vocab_size": model["vocab_size"],
        },
        "search": {  # greedy by default, as edge-infer's own defaults
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": model["max_length"], "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }
    (folder / GENAI_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    add_bos, add_eos = _special_tokens_added(folder / tok["file"], tok["bos_token_id"], eos)
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok.get("bos_token"), "eos_token": tok.get("eos_token"),
        "add_bos_token": add_bos, "add_eos_token": add_eos,
        "model_max_length": model["max_length"],
    }
    template = tok.get("chat_template_file")
    if template and (folder / template).is_file():
        tokenizer_config["chat_template"] = (folder / template).read_text(encoding="utf-8")
    (folder / TOKENIZER_CONFIG).write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
    return f"{GENAI_CONFIG} + {GENAI_GRAPH} (type {kind}, all-position logits, shared KV buffer)"


def _special_tokens_added(path: Path, bos: int | None, eos: list[int]) -> tuple[bool, bool]:
    """Whether our tokenizer.json's post-processor adds BOS / EOS (genai reads it from tokenizer_config)."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(path)).encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0] == bos, len(ids) > 1 and ids[-1] in eos


def _write_graph_without_keep(src: Path, dst: Path) -> None:
    """Copy the graph's nodes with `logits_to_keep` turned into a constant 0 (= every position).

    Loaded without external data: the weights stay references into the same data file."""
    graph = onnx.load(str(src), load_external_data=False)
    if drop_input(graph, LOGITS_TO_KEEP):
        graph.graph.initializer.append(numpy_helper.from_array(np.zeros(1, dtype=np.int64), LOGITS_TO_KEEP))
    if drop_input(graph, PAD_ATTENTION):  # a constant 1: genai's one-token steps pad their attention as before
        graph.graph.initializer.append(numpy_helper.from_array(np.ones(1, dtype=np.int64), PAD_ATTENTION))
    if any(i.name == QUERY_SEQLENS for i in graph.graph.input):
        # genai feeds every row the same number of new tokens: query_seqlens = sequence_length per row.
        query_seqlens_from_shape(graph, "/genai")
    for o in graph.graph.output:
        if o.name == LOGITS:  # (batch, sequence_length, vocab) for genai
            o.type.tensor_type.shape.dim[1].dim_param = "sequence_length"
    onnx.save_model(graph, str(dst))
