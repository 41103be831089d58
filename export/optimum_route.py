"""The route for architectures without a direct graph builder: optimum-onnx's exporter.

It needs the `export` extra (torch, transformers, optimum-onnx). Its graph keeps
the shared I/O names but grows the KV cache by concatenation each step
(`kv_layout: concat` in the manifest) and returns logits for every position,
so the runtime drives it without IOBinding: correct, but slower than the
direct builder's fused graph. `edge-infer export` says which route it took.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import onnx

from edge_infer.contract.errors import ModelFileError, UserError
from edge_infer.contract.quantization import QuantRecord
from edge_infer.export.arch import SUPPORTED
from edge_infer.export.export_folder import (Built, ExportJob, ExportOptions, Route, graph_record, note_plan,
                                             resolve_max_length, save_graph)
from edge_infer.export.graph import GraphIO
from edge_infer.export.progress import Progress
from edge_infer.export.quantize_step import SourceBlocks, quantize_model
from edge_infer.export.sources import Source
from edge_infer.export.spec import DecoderSpec


def available() -> bool:
    try:
        import optimum.exporters.onnx  # noqa: F401
    except ImportError:
        return False
    return True


def supports(model_type: str | None) -> bool:
    """Whether optimum-onnx can export `model_type` as a decoder with past."""
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX export configs)
    from optimum.exporters.tasks import TasksManager

    try:
        tasks = TasksManager.get_supported_tasks_for_model_type(str(model_type), exporter="onnx",
                                                                library_name="transformers")
    except (KeyError, ValueError):
        return False
    return "text-generation-with-past" in tasks


def generic_spec(config: dict) -> DecoderSpec:
    """The geometry the manifest and runtime need, read from common HF config keys."""
    def first(*keys, default=None):
        for k in keys:
            if config.get(k) is not None:
                return config[k]
        if default is None:
            raise ModelFileError(f"config.json: none of {', '.join(keys)} is set; cannot size the KV cache")
        return default

    hidden = int(first("hidden_size", "n_embd", "d_model"))
    heads = int(first("num_attention_heads", "n_head", "num_heads"))
    kv = int(first("num_key_value_heads", "num_kv_heads", "n_head_kv", default=heads))
    eos = config.get("eos_token_id")
    return DecoderSpec(
        model_type=str(config.get("model_type")), vocab_size=int(first("vocab_size")), hidden_size=hidden,
        intermediate_size=int(first("intermediate_size", "n_inner", "ffn_hidden_size", default=4 * hidden)),
        num_layers=int(first("num_hidden_layers", "n_layer", "num_layers")), num_heads=heads, num_kv_heads=kv,
        head_dim=int(config.get("head_dim") or hidden // heads),
        max_position_embeddings=int(first("max_position_embeddings", "n_positions", "max_sequence_length",
                                          default=2048)),
        norm="graph", norm_eps=0.0, activation="graph", mlp="graph", position="graph", rope=None,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        bos_token_id=config.get("bos_token_id"),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ()),
        pad_token_id=config.get("pad_token_id"),
    )


def export_graph(folder: Path, quant: str, progress: Progress) -> onnx.ModelProto:
    """optimum's decoder-with-past graph for the checkpoint in `folder`, loaded with its weights."""
    if quant == "fp16":
        raise UserError("fp16 is not offered on the optimum route; export fp32 or int8/int4")
    if not available():
        raise ModelFileError(
            f"architecture has no direct graph builder (direct: {', '.join(SUPPORTED)}) and the optimum route "
            "needs the export extra: pip install 'edge-infer[export]' optimum-onnx"
        )
    from optimum.exporters.onnx import main_export

    progress.stage("exporting with optimum-onnx (no fused fast path for this architecture)")
    with tempfile.TemporaryDirectory(prefix="edge-infer-optimum-") as tmp:
        try:
            main_export(str(folder), output=tmp, task="text-generation-with-past", do_validation=False,
                        no_post_process=True, device="cpu", local_files_only=True, trust_remote_code=False)
        except (ValueError, KeyError, NotImplementedError) as e:
            raise ModelFileError(f"{folder}: optimum-onnx cannot export this model ({e})") from None
        return onnx.load(str(Path(tmp) / "model.onnx"), load_external_data=True)


class OptimumRoute(Route):
    """The skeleton's route for architectures without a direct builder (export_folder.route_for)."""

    name = "optimum"

    def plan(self, source: Source, options: ExportOptions, progress: Progress) -> tuple[DecoderSpec, int]:
        spec = generic_spec(source.config)
        if options.profile == "gpu":
            raise UserError(f"--profile gpu needs the direct builder, and {spec.model_type} is exported through "
                            "optimum: export it with the default profile")
        if options.kv_cache != "float":
            raise UserError(f"--kv-cache {options.kv_cache} needs the direct builder, and {spec.model_type} is "
                            "exported through optimum (standard attention ops): export with --kv-cache float")
        max_length = resolve_max_length(spec, options.max_length)
        note_plan(progress, spec, self.name, max_length, options.dtype)
        return spec, max_length

    def build(self, job: ExportJob) -> Built:
        options = job.options
        model = export_graph(job.source.path, options.quant, job.progress)
        weights = {t.name for t in model.graph.initializer}
        io = GraphIO(tuple(i.name for i in model.graph.input if i.name not in weights),
                     tuple(o.name for o in model.graph.output))
        details: dict[str, Any] = {}
        reference = None
        if options.quant in ("int8", "int4"):
            reference = model
            q = quantize_model(model, job.spec, SourceBlocks.none(options), options, job.progress)
            model, details = q.model, q.details
        job.progress.stage("writing model")
        save_graph(model, job.folder)
        quant = QuantRecord(options.quant, options.quant_config(job.spec), details)
        return Built(graph_record(self.name, io, options), quant, reference)
