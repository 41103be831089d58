"""`edge-infer export --profile npu`: two static standard-op graphs over one weights file.

Folder layout:
    prefill.onnx      the prefill-chunk graph (sequence_length = chunk)
    decode.onnx       the 1-token decode graph
    model.onnx.data   the weights, written once; both graphs point into it
    manifest.json     graph.kv_layout "static" and graph.static_plan for runtime/static_plan.py

Validation (stored in the manifest) compares against the default builder's fp32 graph
of the same weights (the graph the default int4 export's KL is measured against):
every position through the decode graph, and the last position through the chunked
prefill, max |logit difference| (fp32) or mean KL and top-1 agreement (int8/int4).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from edge_infer.export.arch import load_arch
from edge_infer.export.checkpoint import materialize
from edge_infer.export.export_folder import Built, ExportJob, ExportOptions, Route, builder_route, resolve_max_length
from edge_infer.export.graph import GraphIO
from edge_infer.export.npu_graph import (
    OPSET,
    SHARED_PREFIXES,
    StaticShape,
    WeightBank,
    build_static_decoder,
    check_supported,
)
from edge_infer.export.progress import Progress
from edge_infer.export.sources import Source
from edge_infer.export.spec import DecoderSpec
from edge_infer.contract.errors import UserError
from edge_infer.contract.model_folder import DATA_FILE, INLINE_BELOW, write_manifest
from edge_infer.contract.graph_record import GraphRecord
from edge_infer.contract.quantization import QuantRecord, QuantSettings

NPU_DEFAULT_MAX_LENGTH = 1024  # every pass reads the whole fixed cache: keep it as short as the use needs
PREFILL_FILE, DECODE_FILE = "prefill.onnx", "decode.onnx"


class NpuRoute(Route):
    """The skeleton's route for --profile npu (export_folder.route_for)."""

    def plan(self, source: Source, options: ExportOptions, progress: Progress) -> tuple[DecoderSpec, int]:
        if builder_route(source) != "direct":
            raise UserError(f"--profile npu needs an architecture with a direct builder; "
                            f"'{source.config.get('model_type')}' goes through optimum-onnx")
        self.arch = load_arch(source.config.get("model_type"))
        spec = self.arch.spec(source.config)
        max_length = resolve_max_length(spec, options.max_length, NPU_DEFAULT_MAX_LENGTH)
        chunk = options.chunk
        if not 2 <= chunk <= max_length:
            raise UserError(f"--chunk must be between 2 and max_length ({max_length}), got {chunk}")
        check_supported(spec, max_length)
        progress.note(f"npu profile: static graphs, prefill chunk {chunk}, decode 1, KV cache {max_length} "
                      f"positions, weights {options.quant}")
        return spec, max_length

    def build(self, job: ExportJob) -> Built:
        spec, options, tmp, max_length = job.spec, job.options, job.folder, job.max_length
        job.progress.stage("loading weights")
        weights, _ = materialize(self.arch.recipe(spec, job.source.config), job.source.weights)
        bank = WeightBank(weights, options.quant, options.block_size)
        job.progress.stage("building graphs")
        prefill = build_static_decoder(spec, bank, StaticShape(max_length, options.chunk))
        onnx.save_model(prefill, str(tmp / PREFILL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=INLINE_BELOW, convert_attribute=False)
        del prefill
        decode = build_static_decoder(spec, bank, StaticShape(max_length, 1))
        io = GraphIO(tuple(i.name for i in decode.graph.input), tuple(o.name for o in decode.graph.output))
        share_weights(decode, tmp / PREFILL_FILE)
        onnx.save_model(decode, str(tmp / DECODE_FILE))
        del decode
        return Built(_graph_record(io, options, max_length), _quant_record(options, bank.quantized), weights)

    def validate(self, job: ExportJob, built: Built) -> dict[str, Any]:
        """Through the runtime, so the manifest must exist: written here, then again with the figures."""
        write_manifest(job.folder, self.manifest(job, built, {}))
        job.progress.stage("validating")
        return validate_static(job.folder, job.spec, built.reference, job.source, job.max_length,
                               job.options.quant, job.progress)


def _graph_record(io: GraphIO, options: ExportOptions, max_length: int) -> GraphRecord:
    return GraphRecord(
        DECODE_FILE, io.inputs, io.outputs, dtype="fp32", data_file=DATA_FILE, route="direct", kv_layout="static",
        profile="npu", target="npu: OpenVINO (CPU/GPU/NPU), QNN HTP; runs on the CPU provider too",
        ops=f"standard ONNX only (opset {OPSET}): MatMul/Softmax attention, RMSNorm and rotary from "
            "elementwise ops" + (", DequantizeLinear weight blocks" if options.quant != "fp32" else ""),
        kv_cache=f"one fixed buffer of {max_length} positions per layer held by the runtime; each graph "
                 "returns only the new positions' keys and values",
        static_plan={"max_length": max_length, "prefill": {"file": PREFILL_FILE, "sequence_length": options.chunk},
                     "decode": {"file": DECODE_FILE, "sequence_length": 1}})


def _quant_record(options: ExportOptions, quantized_weights: int) -> QuantRecord:
    if options.quant == "fp32":
        return QuantRecord(options.quant)
    int4 = options.quant == "int4"
    settings = QuantSettings(bits=4 if int4 else 8, block_size=options.block_size, symmetric=not int4,
                             accuracy_level=None, embeddings="fp32 (Gather)", lm_head="int8 blocks",
                             exclude=None, method=None)  # DequantizeLinear blocks, not MatMulNBits
    return QuantRecord(options.quant, settings, {
        "format": "DequantizeLinear (opset 21) with block_size, " + (
            "uint4 with zero points, searched scales" if int4 else "int8 symmetric"),
        "quantized_weights": quantized_weights})


def share_weights(model: onnx.ModelProto, saved: Path) -> None:
    """Point `model`'s weight initializers at the tensors `saved` (a graph already written with
    external data) holds under the same names, so the data file is written once."""
    refs = {t.name: t for t in onnx.load(str(saved), load_external_data=False).graph.initializer
            if t.name.startswith(SHARED_PREFIXES) and t.data_location == onnx.TensorProto.EXTERNAL}
    for t in model.graph.initializer:
        if t.name in refs:
            t.CopyFrom(refs[t.name])


def validate_static(folder: Path, spec, weights: dict, source, max_length: int, quant: str,
                    progress: Progress) -> dict:
    """The static plan on the CPU provider against the default builder's fp32 graph of the same weights."""
    from edge_infer.export.graph import build_decoder
    from edge_infer.export.segments import cpu_session
    from edge_infer.export.validate import all_logits, prompt_ids
    from edge_infer.runtime.manifest import load_manifest
    from edge_infer.runtime.sampling import kl_divergence
    from edge_infer.runtime.static_plan import StaticModel

    prompts = prompt_ids(source, max_length)
    with tempfile.TemporaryDirectory(prefix=".edge-infer-ref-", dir=folder.parent) as ref_dir:
        ref_model, _ = build_decoder(spec, weights, max_length)
        path = Path(ref_dir) / "ref.onnx"
        onnx.save_model(ref_model, str(path), save_as_external_data=True, location="ref.onnx.data")
        del ref_model
        ref = cpu_session(str(path))
        refs = [all_logits(ref, spec, ids) for ids in prompts]  # (positions, vocab) each
        del ref
    model = StaticModel(load_manifest(folder, verify=False), device="cpu")
    worst, worst_last, agree, total, kls = 0.0, 0.0, 0, 0, []
    for ids, a in zip(prompts, refs):
        b = model.forward(np.asarray([ids]), model.new_cache(), logits_to_keep=len(ids))[0]  # decode graph
        last = model.forward(np.asarray([ids]), model.new_cache())[0, -1]  # chunked prefill graph
        worst = max(worst, float(np.abs(a - b).max()))
        worst_last = max(worst_last, float(np.abs(a[-1] - last).max()))
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += len(ids)
        kls.append(kl_divergence(a, b))
    kl = float(np.concatenate(kls).mean())
    progress.note(f"npu {quant} vs default fp32 graph: max |logit diff| {worst:.2e} (decode graph), "
                  f"{worst_last:.2e} (prefill chunks, last position); top-1 {agree}/{total}, mean KL {kl:.5f}")
    return {"reference": "default builder's fp32 graph of the same weights (CPU provider)",
            "max_abs_logit_diff": worst, "max_abs_logit_diff_prefill_last": worst_last,
            "top1_agreement": agree / total, "mean_kl": kl, "positions": total}

