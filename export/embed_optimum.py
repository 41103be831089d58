"""Encoders without a builder of ours (MPNet, DistilBERT, ELECTRA, ...): optimum-onnx's feature-extraction export.

Needs the `export` extra. optimum's graph takes input_ids, attention_mask (and token_type_ids for
BERT-likes, fed zeros by the runtime) and gives last_hidden_state, the contract our own encoder
graphs keep, so the runtime pools it the same way. Its linear layers are MatMuls over initializers,
which the same rewrite quantizes. Our builders (export/encoders/) stay the preferred route.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import onnx

from edge_infer.contract.errors import ModelFileError
from edge_infer.export.progress import Progress

TASK = "feature-extraction"
# Families whose learned positions start after padding_idx: their usable length is max_position_embeddings - 2.
OFFSET_POSITIONS = ("mpnet", "roberta", "camembert", "longformer", "xlm-roberta")


def supports(model_type: str | None) -> bool:
    """Whether optimum-onnx exports `model_type` for feature extraction, as an encoder (no text generation)."""
    from edge_infer.export import optimum_route

    if not optimum_route.available():
        return False
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX export configs)
    from optimum.exporters.tasks import TasksManager

    try:
        tasks = TasksManager.get_supported_tasks_for_model_type(str(model_type), exporter="onnx",
                                                                library_name="transformers")
    except (KeyError, ValueError):
        return False
    return TASK in tasks and "text-generation" not in tasks


class Geometry:
    """What the manifest records of an optimum-exported encoder, read through transformers' config class
    (which maps each family's own key names: DistilBERT's `dim`, `n_layers`, ...)."""

    def __init__(self, folder: Path):
        from transformers import AutoConfig

        c: Any = AutoConfig.from_pretrained(folder, local_files_only=True)
        self.model_type = str(c.model_type)
        self.num_layers, self.num_heads = int(c.num_hidden_layers), int(c.num_attention_heads)
        self.hidden_size, self.vocab_size = int(c.hidden_size), int(c.vocab_size)
        offset = 2 if self.model_type in OFFSET_POSITIONS else 0
        self.max_position_embeddings = int(c.max_position_embeddings) - offset
        self.pad_token_id = getattr(c, "pad_token_id", None)


def export_graph(folder: Path, progress: Progress) -> onnx.ModelProto:
    """optimum's feature-extraction graph of the checkpoint in `folder`, with its weights loaded."""
    from optimum.exporters.onnx import main_export

    progress.stage("exporting with optimum-onnx (feature extraction)")
    with tempfile.TemporaryDirectory(prefix="edge-infer-optimum-") as tmp:
        try:
            main_export(str(folder), output=tmp, task=TASK, do_validation=False, no_post_process=True, device="cpu",
                        local_files_only=True, trust_remote_code=False)
        except (ValueError, KeyError, NotImplementedError) as e:
            raise ModelFileError(f"{folder}: optimum-onnx cannot export this model for embeddings ({e})") from None
        return onnx.load(str(Path(tmp) / "model.onnx"), load_external_data=True)
