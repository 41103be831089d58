"""XLM-RoBERTa / RoBERTa (multilingual-e5, bge-m3): BERT with positions starting at padding_idx + 1."""

from __future__ import annotations

from edge_infer.export.arch._common import Take
from edge_infer.export.encoders import EncoderSpec, bert


def spec(config: dict) -> EncoderSpec:
    # Real tokens of a right-padded row sit at positions pad + 1, pad + 2, ... (create_position_ids_from_input_ids).
    return bert.spec(config, position_offset=int(config.get("pad_token_id", 1)) + 1,
                     model_type=str(config.get("model_type", "xlm-roberta")))


def recipe(s: EncoderSpec, names: set[str]) -> dict[str, Take]:
    return bert.recipe(s, names)
