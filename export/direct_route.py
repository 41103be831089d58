"""The direct routes: a Hugging Face folder or a GGUF file through our fused graph builder (export/graph.py).

The graph streams (`build_streamed`): weights are read from the memory-mapped source one at a
time, when they are needed, and each tensor is appended to the external-data file as it is made,
so memory holds about one weight rather than the model (a 1B model: about 1-2 GB instead of 19 GB).
A GGUF source's quantized blocks go into the graph as they are where they fit (export/quantize_step.py),
and the quantization record says which did (export/gguf_report.py).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from edge_infer.contract.model_folder import DATA_FILE, GRAPH_FILE
from edge_infer.contract.quantization import QuantRecord
from edge_infer.export.arch import load_arch
from edge_infer.export.checkpoint import LazyWeights
from edge_infer.export.export_folder import (FLOAT_DATA, Built, ExportJob, ExportOptions, Route, graph_record,
                                             manifest_body, note_plan, resolve_max_length)
from edge_infer.export.graph import GraphIO, build_decoder
from edge_infer.export.progress import CountedWeights, Progress
from edge_infer.export.quantize_step import Quantized, SourceBlocks, quantize_model
from edge_infer.export.sources import Source
from edge_infer.export.spec import DecoderSpec


class DirectRoute(Route):
    """A Hugging Face folder whose architecture has a builder (export/arch)."""

    def plan(self, source: Source, options: ExportOptions, progress: Progress) -> tuple[DecoderSpec, int]:
        self.arch = load_arch(source.config.get("model_type"))
        spec = self.arch.spec(source.config)
        max_length = resolve_max_length(spec, options.max_length)
        kv_dtype = options.kv_cache if options.kv_cache != "float" else options.dtype
        note_plan(progress, spec, self.name, max_length, kv_dtype)
        return spec, max_length

    def build(self, job: ExportJob) -> Built:
        io, quantized, reference = build_streamed(job, self.arch.recipe(job.spec, job.source.config))
        details = dict(quantized.details) if quantized is not None else {}
        details.update(self.import_report(job, quantized))
        quant = QuantRecord(job.options.quant, job.options.quant_config(job.spec), details)
        return Built(graph_record(self.name, io, job.options), quant, reference)

    def import_report(self, job: ExportJob, quantized: Quantized | None) -> dict[str, Any]:
        """Further details of the quantization record (the GGUF route's import report)."""
        return {}

    def finish(self, job: ExportJob, built: Built) -> Built:
        from edge_infer.export.graph_headers import write_headers

        (job.folder / FLOAT_DATA).unlink(missing_ok=True)  # the float graph's own tensors (the reference's)
        built = replace(built, reference=None)
        if job.options.kv_cache != "float":
            from edge_infer.export.kv_calibrate import calibrate_kv_cache

            record = calibrate_kv_cache(job.folder, GRAPH_FILE, job.source, job.spec, job.options.kv_cache,
                                        job.max_length, job.progress)
            built = replace(built, sections={**built.sections, "kv_cache": record})
        # the full graph and one for onnxruntime before 1.32 (export/graph_headers.py), over the final weights
        return replace(built, graph=replace(built.graph, headers=write_headers(job.folder, GRAPH_FILE)))

    def manifest(self, job: ExportJob, built: Built, validation: dict[str, Any]) -> dict[str, Any]:
        """With onnxruntime-genai's files beside the graph, where genai can read it."""
        if "kv_cache" in built.sections:
            genai = "not written: onnxruntime-genai does not read a quantized KV cache"
        else:
            from edge_infer.export.genai_interop import write_genai_files

            genai = write_genai_files(job.folder, manifest_body(job, built, validation), GRAPH_FILE)
            job.progress.note(f"onnxruntime-genai: {genai}")
        return manifest_body(job, replace(built, graph=replace(built.graph, genai=genai)), validation)


class GgufRoute(DirectRoute):
    """A GGUF file: the direct builder, its blocks kept where they fit, and a report of which were."""

    def import_report(self, job: ExportJob, quantized: Quantized | None) -> dict[str, Any]:
        from edge_infer.export.gguf_report import import_report, summary_lines

        o = job.options
        float_kept = {n for n, choice in (("embed.weight", o.embeddings), ("lm_head.weight", o.lm_head))
                      if choice == "fp"}
        none: frozenset[str] = frozenset()
        kept, folded, widened = ((quantized.kept, quantized.folded, quantized.widened) if quantized is not None
                                 else (none, none, none))
        report = import_report(self.arch.recipe(job.spec, job.source.config), job.source.weights, kept,
                               o.quant, float_kept, folded, widened)
        for line in summary_lines(report):
            job.progress.note(f"GGUF {line}")
        return {"gguf_tensors": report}


def build_streamed(job: ExportJob, recipe: dict, build=None) -> tuple[GraphIO, Quantized | None, Any]:
    """Build (and quantize) the direct route's graph one tensor at a time, straight into job.folder.

    fp32/fp16: each weight is read from the memory-mapped source when the builder asks for it
    and appended to the external-data file at once; the protobuf keeps offsets only.
    int8/int4: the float graph is built with its weights deferred (checkpoint.Deferred): nothing
    is read until the quantizer asks for a weight, which is then read, quantized and written
    to the model's data file before the next one (weights taken from GGUF blocks are never read
    in float at all). Only small or transformed float tensors go to FLOAT_DATA, removed before
    the folder is finished. The float graph stays the validation reference (read again from the
    source, segment by segment). Returns (io, what the quantization made or None, that reference
    or None). `recipe`: the canonical weights (arch.recipe); embedding exports (export/embed_export.py)
    pass their own and `build(weights, dtype, store) -> (graph, io)` (an encoder, or the decoder's hidden head).
    """
    from edge_infer.export.segments import StoredGraph
    from edge_infer.quantize.external import DataFile, save_streamed

    spec, source, options, tmp, progress = job.spec, job.source, job.options, job.folder, job.progress
    quantized = options.quant in ("int8", "int4")
    weights = LazyWeights(recipe, source.weights)
    weights.deferred = quantized
    building = progress.stage("building graph" + ("" if quantized else " (weights streamed to disk)"),
                              total=len(weights), unit="weight")
    data = DataFile(tmp / (FLOAT_DATA if quantized else DATA_FILE))
    try:
        counted = CountedWeights(weights, building)
        model, io = (build(counted, options.dtype, data) if build is not None
                     else build_decoder(spec, counted, job.max_length, dtype=options.dtype, store=data))
        if not quantized:
            save_streamed(model, tmp / GRAPH_FILE, data)
            return io, None, None
    finally:
        data.close()
    reference = StoredGraph(model, tmp, data.deferred)
    out = DataFile(tmp / DATA_FILE)
    try:
        read, read_rows = _source_precision(reference, data.deferred)
        q = quantize_model(model, spec, SourceBlocks.of(weights.blocks, weights, options), options, progress,
                           read=read, sink=lambda t: out.move(t, tmp, data.deferred), read_rows=read_rows)
        writing = progress.stage("writing model", unit="tensor")
        save_streamed(q.model, tmp / GRAPH_FILE, out, tmp, data.deferred, progress=writing.update)
    finally:
        out.close()
    return io, q, reference


def _source_precision(reference, deferred: dict):
    """The quantizer's readers: a weight not read yet comes in the source's float32, not rounded to
    the graph's dtype first, so an fp16-activation export (--profile gpu) rounds every weight to the
    same int4/int8 codes as the default export and differs from it only in fp16 scales."""
    from edge_infer.export.checkpoint import Deferred

    def read(t):
        d = deferred.get(t.name)
        return d.astype(np.float32).materialize() if isinstance(d, Deferred) else reference.read(t)

    def read_rows(t, start: int, stop: int):
        d = deferred.get(t.name)
        return d.astype(np.float32).materialize_rows(start, stop) if isinstance(d, Deferred) \
            else reference.read_rows(t, start, stop)

    return read, read_rows
