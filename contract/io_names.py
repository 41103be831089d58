"""The decoder graph's input and output names, spelled once.

The export writes graphs with these names, the runtime binds them and the manifest lists
them (`graph.inputs` / `graph.outputs`); they follow optimum-onnx and onnxruntime-genai, so
other tools open our graphs. Every folder takes them from here (tests/test_borders.py
fails on a second spelling).

    input_ids       (batch, sequence_length)            int64
    attention_mask  (batch, total_sequence_length)      int64, right-padded, 1 = real token
    position_ids    (batch, sequence_length)            int64, learned positions only
    logits_to_keep  (1,)                                int64, default profile only
    query_seqlens   (batch,)                            int64, default profile only
    past_key_values.{layer}.key / .value
  ->
    logits          (batch, logits_to_keep, vocab)      float32
    present.{layer}.key / .value
"""

from __future__ import annotations

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS_TO_KEEP = "logits_to_keep"
QUERY_SEQLENS = "query_seqlens"
# (1,) int64: 1 pads a one-token pass's attention to two rows (export/graph.py _one_token_padding), 0 skips
# that when no other grouping of the pass must match it (runtime/model.py binds it every pass).
PAD_ATTENTION = "pad_attention"
LOGITS = "logits"

PAST = "past_key_values.{layer}.{kind}"  # a template: past(layer, kind) fills it
PRESENT = "present.{layer}.{kind}"
PAST_PREFIX = PAST.split("{", 1)[0]  # "past_key_values."
PRESENT_PREFIX = PRESENT.split("{", 1)[0]  # "present."
KV_KINDS = ("key", "value")

# com.microsoft.GroupQueryAttention's inputs in onnxruntime 1.32's order. Releases add inputs at the end:
# 1.24 stops after head_sink, 1.31 after k_norm_weight, 1.32 adds query_seqlens. A graph header's
# manifest record names the optional ones it feeds (export/graph_headers.py), and the runtime loads
# the first header whose inputs the installed onnxruntime knows (devices/capabilities.py).
ATTENTION_INPUTS = ("query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length",
                    "cos_cache", "sin_cache", POSITION_IDS, "attention_bias", "head_sink", "k_scale", "v_scale",
                    "q_norm_weight", "k_norm_weight", QUERY_SEQLENS)
ATTENTION_CORE_INPUTS = 7  # query .. total_sequence_length: in every release that has the op


def past(layer: int | str, kind: str) -> str:
    """`past_key_values.{layer}.{kind}`; `layer` may be a placeholder such as "%d" (genai's config)."""
    return PAST.format(layer=layer, kind=kind)


def present(layer: int | str, kind: str) -> str:
    return PRESENT.format(layer=layer, kind=kind)


def past_pair(layer: int) -> tuple[str, str]:
    """(key, value) past names of one layer."""
    return past(layer, "key"), past(layer, "value")


def present_pair(layer: int) -> tuple[str, str]:
    return present(layer, "key"), present(layer, "value")

# Embedding graphs (export --task embed, encoder models): the final hidden state, pooled by the runtime.
#   input_ids, attention_mask  (batch, sequence_length)  int64, right-padded
#   -> last_hidden_state       (batch, sequence_length, hidden)  float32
LAST_HIDDEN_STATE = "last_hidden_state"
TOKEN_TYPE_IDS = "token_type_ids"  # encoders exported through optimum (BERT-likes): all zeros, one segment
