"""`edge-infer export`: source -> ONNX decoder (+ quantization) -> validated, hashed model folder.

The folder is written atomically: everything goes into a hidden temporary
sibling, the manifest is written last, and only then is the folder renamed into
place. An export that fails or is killed leaves nothing that loads.

The direct route streams (`_build_streamed`): weights are read from the memory-mapped
source one at a time, when they are needed, and each tensor is appended to the
external-data file as it is made, so memory holds about one weight rather than the model
(a 1B model: about 1-2 GB instead of 19 GB).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from edge_infer.export.arch import load_arch
from edge_infer.export.atomic import atomic_folder, check_target
from edge_infer.export.checkpoint import LazyWeights
from edge_infer.export.graph import GraphIO, build_decoder
from edge_infer.export.progress import CountedWeights, Progress
from edge_infer.export.sources import Source, open_source, with_chat_template
from edge_infer.export.spec import DecoderSpec
from edge_infer.contract.errors import UserError
from edge_infer.contract.graph_record import GraphRecord, kv_cache_bytes
from edge_infer.contract.quantization import QuantRecord
from edge_infer.contract.model_folder import (CHAT_TEMPLATE_FILE, DATA_FILE, GRAPH_FILE, INLINE_BELOW, TOKENIZER_FILE,
                                         write_manifest)
from edge_infer.quantize.kv_cache import KV_CACHE_KINDS

if TYPE_CHECKING:
    from edge_infer.export.segments import StoredGraph
    from edge_infer.quantize.config import QuantConfig

QUANTS = ("fp32", "fp16", "int8", "int4")
TASKS = ("auto", "generate", "embed")
# npu: standard ONNX ops, static shapes (OpenVINO, QNN, any provider); gpu: the default graph with fp16
# activations and KV cache (CUDA, DirectML), MatMulNBits with fp16 scales, logits cast to fp32.
PROFILES = ("default", "npu", "gpu")
DEFAULT_MAX_LENGTH = 4096
FLOAT_DATA = "float.onnx.data"  # small float tensors of an int8/int4 export's float graph, until it is finished
VERSION = "0.1.0"
# How GGUF blocks with a minimum per block (Q4_1, Q4_K) are imported; measured on the default
# model (perplexity vs fp32 / decode speed vs exact, benchmarks/QUALITY.md and RESULTS.md):
# exact 1.004 / 1x, mixed 1.036 / 1.05-1.17x, requantize 1.144 / 1.3-1.4x; folded (the default):
# the residuals folded into the weight (quantize/block_offsets.py fold_minimum).
GGUF_IMPORTS = ("folded", "exact", "mixed", "requantize")
MLP_WEIGHTS = (".gate_up.weight", ".up.weight", ".down.weight")  # where "mixed" keeps the exact import


@dataclass(frozen=True)
class ExportOptions:
    quant: str = "int4"
    max_length: int | None = None
    block_size: int = 32
    symmetric: bool = False
    accuracy_level: int = 4
    embeddings: str = "int8"  # int8 | int4 | fp
    lm_head: str = "int8"
    rounding: str = "search"  # 4-bit rounding of float weights: "search" (least-squares scales) or "rtn"
    # GGUF blocks with a minimum per block (Q4_1, Q4_K), see GGUF_IMPORTS: "folded" (the block
    # residuals as extra input columns of the weight, rounded once), "exact" (a float residual
    # branch per weight, slower decode), "mixed" (exact in the MLP, rounded again in attention) or
    # "requantize" (all rounded again with searched scales: fastest, lossy).
    gguf_import: str = "folded"
    validate: bool = True
    force: bool = False
    profile: str = "default"  # "npu": static standard-op graphs (export/npu_export.py)
    chunk: int = 64  # npu profile: tokens per prefill-chunk graph pass
    # The KV cache's storage (export/kv_calibrate.py): "float" (the model's dtype), or "int8" /
    # "int4" with calibrated per-channel scales, which GroupQueryAttention applies as it writes.
    kv_cache: str = "float"
    # --chat-template NAME|FILE: a built-in template or a Jinja file, stored in place of the model's own
    # (runtime/template_library.py); None keeps the model's, or its family's when it has none.
    chat_template: str | None = None
    # "generate" (logits), "embed" (the final hidden state, pooled at run time: export/embed_export.py) or
    # "auto": embed for an encoder folder (BERT, XLM-RoBERTa, ModernBERT, NomicBERT), generate otherwise.
    task: str = "auto"
    matryoshka: bool | None = None  # embed: a prefix of the vector is an embedding too (None: as the source says)

    def check(self) -> None:
        if self.quant not in QUANTS:
            raise UserError(f"--quant must be one of {', '.join(QUANTS)}, got '{self.quant}'")
        if self.max_length is not None and self.max_length < 16:
            raise UserError(f"--max-length must be at least 16, got {self.max_length}")
        if self.gguf_import not in GGUF_IMPORTS:
            raise UserError(f"--gguf-import must be one of {', '.join(GGUF_IMPORTS)}, got '{self.gguf_import}'")
        if self.profile not in PROFILES:
            raise UserError(f"--profile must be one of {', '.join(PROFILES)}, got '{self.profile}'")
        if self.block_size not in (16, 32, 64, 128, 256):
            raise UserError(f"--block-size must be one of 16, 32, 64, 128, 256, got {self.block_size}")
        if self.task not in TASKS:
            raise UserError(f"--task must be one of {', '.join(TASKS)}, got '{self.task}'")
        if self.kv_cache not in KV_CACHE_KINDS:
            raise UserError(f"--kv-cache must be one of {', '.join(KV_CACHE_KINDS)}, got '{self.kv_cache}'")
        if self.kv_cache != "float" and self.profile == "npu":
            raise UserError("--kv-cache int8/int4 needs onnxruntime's GroupQueryAttention, which the npu profile's "
                            "standard-op graphs do not use: drop --kv-cache or --profile npu")

    @property
    def dtype(self) -> str:
        """The graph's activations and KV cache: fp16 for --quant fp16 and the gpu profile, else fp32."""
        return "fp16" if self.quant == "fp16" or self.profile == "gpu" else "fp32"

    def quant_config(self) -> QuantConfig | None:
        """The quantization settings these options ask for (None for fp32/fp16): what the rewrite gets
        and what the manifest records."""
        from edge_infer.quantize.config import QuantConfig

        if self.quant not in ("int8", "int4"):
            return None
        return QuantConfig.from_options(self.quant, self.block_size, self.symmetric, self.accuracy_level,
                                        self.embeddings, self.lm_head, self.rounding)


def export_model(src: str | Path, out: str | Path, options: ExportOptions = ExportOptions(),
                 progress: Progress | None = None) -> Path:
    """Export `src` (HF folder or .gguf) to the model folder `out`; returns its path."""
    options.check()
    if options.task != "generate":
        from edge_infer.export.embed_export import export_embedding, source_is_encoder

        if options.task == "embed" or source_is_encoder(src):
            return export_embedding(src, out, options, progress or Progress(quiet=True))
    elif _is_encoder(src):
        raise UserError(f"{src} is an encoder model: it embeds text and cannot generate it; export it with "
                        "--task embed (or auto)")
    if options.profile == "npu":
        from edge_infer.export.npu_export import export_npu

        return export_npu(src, out, options, progress)
    progress = progress or Progress(quiet=True)
    out = Path(out)
    check_target(out, options.force)
    progress.stage(f"reading {src}")
    source = with_chat_template(open_source(src), options.chat_template, progress.note)
    route = _route(source)
    if route == "direct":
        arch = load_arch(source.config.get("model_type"))
        spec = arch.spec(source.config)
    else:
        from edge_infer.export import optimum_route

        spec = optimum_route.generic_spec(source.config)
        if options.profile == "gpu":
            raise UserError(f"--profile gpu needs the direct builder, and {spec.model_type} is exported through "
                            "optimum: export it with the default profile")
        if options.kv_cache != "float":
            raise UserError(f"--kv-cache {options.kv_cache} needs the direct builder, and {spec.model_type} is "
                            "exported through optimum (standard attention ops): export with --kv-cache float")
    max_length = resolve_max_length(spec, options.max_length)
    progress.note(f"architecture {spec.model_type} ({route} route): {spec.num_layers} layers, hidden "
                  f"{spec.hidden_size}, {spec.num_heads} heads / {spec.num_kv_heads} kv heads, vocab {spec.vocab_size}")
    kv_dtype = options.kv_cache if options.kv_cache != "float" else options.dtype
    kv_mib = kv_cache_bytes(kv_dtype, spec.num_layers, spec.num_kv_heads, spec.head_dim, max_length)
    progress.note(f"max_length {max_length} (model context {spec.max_position_embeddings}): "
                  f"KV cache {kv_mib / 2**20:.0f} MiB per sequence")
    with atomic_folder(out, options.force) as tmp:
        if route == "direct":
            model, io, quant_info, reference = _build_streamed(arch, spec, source, max_length, options, tmp, progress)
        else:
            model = optimum_route.export_graph(source.path, options.quant, progress)
            io = GraphIO(tuple(i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}),
                         tuple(o.name for o in model.graph.output))
            quant_info: dict[str, Any] = {}
            reference = None
            if options.quant in ("int8", "int4"):
                reference = model
                model, quant_info = _quantize(model, spec, {}, options, progress)
            progress.stage("writing model")
            save_graph(model, tmp)
        if source.kind == "gguf" and route == "direct":
            from edge_infer.export.gguf_report import import_report, summary_lines

            float_kept = {n for n, o in (("embed.weight", options.embeddings), ("lm_head.weight", options.lm_head))
                          if o == "fp"}
            quant_info["gguf_tensors"] = import_report(arch.recipe(spec, source.config), source.weights,
                                                       set(quant_info.pop("_kept", ())), options.quant, float_kept,
                                                       set(quant_info.pop("_folded", ())))
            for line in summary_lines(quant_info["gguf_tensors"]):
                progress.note(f"GGUF {line}")
        quant_info.pop("_kept", None)  # working state of the report, not part of the manifest
        quant_info.pop("_folded", None)
        del model
        _write_tokenizer(source, tmp)
        validation = {}
        if options.validate:
            from edge_infer.export.validate import validate_export

            validation = validate_export(tmp, source, spec, reference, max_length, progress)
        del reference
        _remove_float_graph(tmp)
        kv_record = None
        if options.kv_cache != "float":
            from edge_infer.export.kv_calibrate import calibrate_kv_cache

            kv_record = calibrate_kv_cache(tmp, GRAPH_FILE, source, spec, options.kv_cache, max_length, progress)
        hashing = progress.stage("writing manifest", unit="B", key="manifest")
        quant = QuantRecord(options.quant, options.quant_config(), quant_info)
        graph = graph_record(route, io, options)
        body = _manifest_body(spec, source, graph, quant, max_length, validation)
        if kv_record is not None:
            body["kv_cache"] = kv_record
        if route == "direct":  # the full graph and one for onnxruntime before 1.32 (export/graph_headers.py)
            from edge_infer.export.graph_headers import write_headers

            graph = replace(graph, headers=write_headers(tmp, GRAPH_FILE))
            body["graph"] = graph.to_manifest()
            from edge_infer.export.genai_interop import write_genai_files

            genai = ("not written: onnxruntime-genai does not read a quantized KV cache" if kv_record is not None
                     else write_genai_files(tmp, body, GRAPH_FILE))
            if kv_record is None:
                progress.note(f"onnxruntime-genai: {genai}")
            body["graph"] = replace(graph, genai=genai).to_manifest()
        write_manifest(tmp, body, hashing.update)
    progress.done(f"exported to {out}")
    return out


def graph_record(route: str, io: GraphIO, options: ExportOptions) -> GraphRecord:
    """The manifest's graph record of a default-profile export through `route` ("direct" | "optimum")."""
    graph = GraphRecord(GRAPH_FILE, io.inputs, io.outputs, dtype=options.dtype, data_file=DATA_FILE, route=route,
                        profile="gpu" if options.profile == "gpu" else None)
    if route != "direct":
        return replace(graph, kv_layout="concat", ops="optimum-onnx export (standard ops)",
                       kv_cache="past and present as separate tensors, concatenated each step")
    kv_cache = "one buffer of max_length per layer, shared by past and present"
    if options.kv_cache != "float":
        kv_cache += f", {options.kv_cache} with per-channel scales"
    return replace(graph, kv_layout="shared", kv_cache=kv_cache,
                   ops="com.microsoft GroupQueryAttention, SkipSimplifiedLayerNormalization, MatMulNBits",
                   attention_padding="in-graph")  # one-token passes run attention as two tokens (graph.py)


def _is_encoder(src: str | Path) -> bool:
    from edge_infer.export.embed_export import source_is_encoder

    return source_is_encoder(src)


def _route(source: Source) -> str:
    """"direct" (our fused graph builder) when the architecture has one, else "optimum"."""
    from edge_infer.export.arch import ALIASES, SUPPORTED, resolve_model_type

    model_type = source.config.get("model_type")
    if ALIASES.get(model_type, model_type) in SUPPORTED or source.kind == "gguf":
        return "direct"
    from edge_infer.export import optimum_route

    if not optimum_route.available() or not optimum_route.supports(model_type):
        resolve_model_type(model_type)  # raises the clear "not supported; supported: ..." error
    return "optimum"


def resolve_max_length(spec: DecoderSpec, requested: int | None) -> int:
    context = spec.max_position_embeddings
    if requested is None:
        return min(DEFAULT_MAX_LENGTH, context)
    if requested > context:
        raise UserError(f"--max-length {requested} exceeds the model's context of {context} positions")
    return requested


def _build_streamed(arch, spec: DecoderSpec, source: Source, max_length: int, options: ExportOptions,
                    tmp: Path, progress: Progress, recipe: dict | None = None,
                    build=None) -> tuple[onnx.ModelProto, GraphIO, dict, StoredGraph | None]:
    """Build (and quantize) the direct route's graph one tensor at a time, straight into `tmp`.

    fp32/fp16: each weight is read from the memory-mapped source when the builder asks for it
    and appended to the external-data file at once; the protobuf keeps offsets only.
    int8/int4: the float graph is built with its weights deferred (checkpoint.Deferred): nothing
    is read until the quantizer asks for a weight, which is then read, quantized and written
    to the model's data file before the next one (weights taken from GGUF blocks are never read
    in float at all). Only small or transformed float tensors go to FLOAT_DATA, removed before
    the folder is finished. The float graph stays the validation reference (read again from the
    source, segment by segment). Returns (graph proto, io, what the quantization did (the record's
    details), that reference or None). Embedding exports (export/embed_export.py) pass their own
    `recipe` and `build(weights, dtype, store) -> (graph, io)` (an encoder, or the decoder's hidden head).
    """
    from edge_infer.export.segments import StoredGraph
    from edge_infer.quantize.external import DataFile, save_streamed

    quantized = options.quant in ("int8", "int4")
    weights = LazyWeights(recipe if recipe is not None else arch.recipe(spec, source.config), source.weights)
    weights.deferred = quantized
    building = progress.stage("building graph" + ("" if quantized else " (weights streamed to disk)"),
                              total=len(weights), unit="weight")
    data = DataFile(tmp / (FLOAT_DATA if quantized else DATA_FILE))
    try:
        counted = CountedWeights(weights, building)
        model, io = (build(counted, options.dtype, data) if build is not None
                     else build_decoder(spec, counted, max_length, dtype=options.dtype, store=data))
        if not quantized:
            save_streamed(model, tmp / GRAPH_FILE, data)
            return model, io, {}, None
    finally:
        data.close()
    reference = StoredGraph(model, tmp, data.deferred)
    pre = _LazySourceBlocks(weights, 4 if options.quant == "int4" else 8, options)
    out = DataFile(tmp / DATA_FILE)
    try:
        read, read_rows = _source_precision(reference, data.deferred)
        q, info = _quantize(model, spec, pre, options, progress, read=read,
                            sink=lambda t: out.move(t, tmp, data.deferred), read_rows=read_rows)
        writing = progress.stage("writing model", unit="tensor")
        save_streamed(q, tmp / GRAPH_FILE, out, tmp, data.deferred, progress=writing.update)
    finally:
        out.close()
    return q, io, info, reference


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


def _remove_float_graph(folder: Path) -> None:
    (folder / FLOAT_DATA).unlink(missing_ok=True)


def _quantize(model: onnx.ModelProto, spec: DecoderSpec, blocks, options: ExportOptions,
              progress: Progress, read=None, sink=None, read_rows=None) -> tuple[onnx.ModelProto, dict]:
    """Quantize `model`; `blocks` is a dict of source blocks (canonical name -> blocks) or a
    `_LazySourceBlocks`. Streaming: `read(tensor)` gives a float weight stored outside the
    protobuf, `read_rows(tensor, start, stop)` rows of one, and `sink(tensor)` moves each new tensor
    to the data file (quantize_graph)."""
    from edge_infer.quantize.rewrite import quantize_graph, quantize_summary

    config = options.quant_config()
    assert config is not None, "only int8/int4 exports are quantized"
    bits = config.validate().bits
    embed_bits = {"int8": 8, "int4": 4}.get(config.embeddings_choice(), 0)
    if isinstance(blocks, _LazySourceBlocks):
        pre, minimums, folded = blocks, blocks.minimums, blocks.folded
        blocks.embed_bits = embed_bits
    else:
        pre, minimums, folded = _source_blocks(blocks, bits, embed_bits, options.block_size, options.gguf_import)
    progress.stage(f"quantizing to {options.quant} (block {options.block_size}, "
                   f"{'symmetric' if options.symmetric else 'asymmetric'})", unit="weight")
    bar = progress.bar("quantize", total=None)
    q = quantize_graph(model, config, prequantized=pre or None, progress=bar.update, loader=read, sink=sink,
                       row_loader=read_rows)
    bar.close()
    n_pre = len(pre)
    if isinstance(blocks, _LazySourceBlocks):
        blocks = blocks.seen
    if minimums:
        from edge_infer.quantize.block_offsets import add_block_offsets

        add_block_offsets(q, minimums, options.block_size)
    if folded:
        from edge_infer.quantize.block_offsets import add_block_sums

        add_block_sums(q, folded, options.block_size)
    info: dict[str, Any] = {"summary": quantize_summary(q)}  # the record's details (QuantRecord)
    requantized = info["summary"].get("requantized") or []
    if requantized:
        progress.note(f"{len(requantized)} source-quantized weights did not match {options.quant} block "
                      f"{options.block_size} and were re-quantized (a second rounding)")
    if blocks:
        info["gguf_import"] = options.gguf_import
    if minimums:
        info["gguf_q4_1"] = (f"{len(minimums)} Q4_1/Q4_K weights imported exactly "
                             "(integer zero point + block residual)")
    if folded:
        info["gguf_q4_1_folded"] = (f"{len(folded)} Q4_1/Q4_K weights imported with their block residuals "
                                    "folded into the weight (integer zero point + residual columns rounded once)")
    mixed = sorted(name for name, b in blocks.items() if b is None)
    if mixed:
        info["mixed_source_types"] = mixed
        progress.note(f"{len(mixed)} fused weights combine source tensors of different quantization types; "
                      "they are quantized once from the exact float weights")
    info["_kept"] = sorted(pre.kept if isinstance(pre, _LazySourceBlocks) else pre)  # read by gguf_report
    info["_folded"] = sorted(folded)
    if n_pre:
        info["source_blocks"] = f"{n_pre} weights kept their source quantization where bits and block size matched"
    return q, info


class _LazySourceBlocks:
    """The GGUF blocks the rewrite may use, computed per weight when the rewrite asks for it
    (`get`), so the blocks of the whole model are never in memory together. Fills `minimums`
    (residuals for quantize.block_offsets) and `seen` (canonical name -> source blocks, or None
    for mixed types, with the arrays dropped) as it goes, for the quantization record."""

    def __init__(self, weights: LazyWeights, bits: int, options: ExportOptions):
        self.weights, self.bits, self.options = weights, bits, options
        self.embed_bits = 8
        self.minimums: dict[str, np.ndarray] = {}
        self.folded: set[str] = set()
        self.seen: dict[str, object] = {}
        self.kept: set[str] = set()  # graph names whose source blocks were used as they are
        self.used = 0
        names = {"model.embed_tokens.weight": "embed.weight", "lm_head.weight": "lm_head.weight"}
        self._canonical = {**{f"model.{c}": c for c in weights}, **names}

    def __bool__(self) -> bool:
        return True

    def __len__(self) -> int:
        return self.used

    def get(self, name: str, default=None):
        canonical = self._canonical.get(name)
        if canonical is None or canonical not in self.weights:
            return default
        found, b = self.weights.blocks(canonical)
        if not found:
            return default
        self.seen[canonical] = None if b is None else True
        if b is None:
            return default
        o = self.options
        pre, minimums, folded = _source_blocks({canonical: b}, self.bits, self.embed_bits, o.block_size,
                                               o.gguf_import)
        self.minimums.update(minimums)
        self.folded.update(folded)
        self.used += len(pre)
        if name in pre:
            self.kept.add(name)
        return pre.get(name, default)


def _source_blocks(blocks: dict, bits: int, embed_bits: int, block_size: int,
                   gguf_import: str = "folded") -> tuple[dict, dict, set]:
    """GGUF blocks that the rewrite can use as they are, keyed by graph initializer name, plus the
    per-block residuals of scale-and-minimum formats (Q4_1, Q4_K) for quantize.block_offsets.

    Usable: the asked bits with blocks that split exactly into `block_size` (32 -> 16), or more bits
    than asked (Q6_K, Q8_0 stay 8-bit). Anything else is left out, so the rewrite quantizes the
    exact float weights once instead of re-rounding blocks. gguf_import "mixed" also leaves out the
    attention weights that would need the residual branch; "requantize" leaves out every such
    weight and wider blocks (Q8_0 in an int4 export): every weight is then rounded to what was asked.
    """
    from edge_infer.quantize.block_offsets import fold_minimum, split_minimum
    from edge_infer.quantize.nbits import split_blocks

    names = {"embed.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight"}
    pre: dict = {}
    minimums: dict = {}
    folded: set[str] = set()
    for canonical, b in blocks.items():
        if b is None:
            continue
        name, ql = names.get(canonical, f"model.{canonical}"), _as_linear(b)
        target = embed_bits if canonical in names else bits
        exact_split = ql.bits == target and ql.block_size % block_size == 0
        if not (exact_split or (target and ql.bits > target and gguf_import != "requantize")):
            continue
        split = split_minimum(ql)
        if split is not None and not exact_split and ql.block_size != block_size:
            continue  # a minimum per block is added back at the export's block size only: round once instead
        fold = split is not None and gguf_import == "folded" and exact_split
        if split is not None:
            keep = gguf_import in ("exact", "folded") or (gguf_import == "mixed" and canonical.endswith(MLP_WEIGHTS))
            if canonical in names or not keep:  # (the embedding gather has no residual branch)
                continue
            if not fold:
                ql, minimums[name] = split
        if exact_split and ql.block_size != block_size:
            factor = ql.block_size // block_size
            ql = split_blocks(ql, block_size)
            if name in minimums:
                minimums[name] = np.repeat(minimums[name], factor, axis=1)
        if fold:
            folded_ql = fold_minimum(ql)
            if folded_ql is None:
                ql, minimums[name] = split_minimum(ql)  # type: ignore[misc]
            else:
                ql = folded_ql
                folded.add(name)
        pre[name] = ql
    return pre, minimums, folded


def _as_linear(b):
    """Source blocks with the zero points MatMulNBits reads best (Q4_0 and Q8_0 map exactly; Q4_1
    goes through quantize.block_offsets, since a float zero point would leave onnxruntime's fast kernels)."""
    from dataclasses import replace

    zp = b.zero_points
    if zp is not None and np.all(zp == 2 ** (b.bits - 1)):
        zp = None  # symmetric (Q4_0, Q8_0): MatMulNBits' implied zero point
    elif zp is not None and np.all(zp == np.round(zp)):
        zp = zp.astype(np.uint8)  # integer zero points (Q6_K: 32) as MatMulNBits' packed uint8
    return replace(b, zero_points=zp)


def save_graph(model: onnx.ModelProto, folder: Path) -> None:
    onnx.save_model(model, str(folder / GRAPH_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=INLINE_BELOW, convert_attribute=False)


def _write_tokenizer(source: Source, folder: Path) -> None:
    source.tokenizer.save(str(folder / TOKENIZER_FILE))
    if source.chat_template:
        (folder / CHAT_TEMPLATE_FILE).write_text(source.chat_template, encoding="utf-8")


def _manifest_body(spec: DecoderSpec, source: Source, graph: GraphRecord, quant: QuantRecord,
                   max_length: int, validation: dict) -> dict:
    tok = source.tokenizer
    eos = list(dict.fromkeys(list(source.eos_token_ids) + list(spec.eos_token_ids)))
    return {
        "created_by": f"edge-infer {VERSION}",
        "model": {
            "architecture": spec.model_type, "num_layers": spec.num_layers, "num_heads": spec.num_heads,
            "num_kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim, "hidden_size": spec.hidden_size,
            "intermediate_size": spec.intermediate_size, "vocab_size": spec.vocab_size, "max_length": max_length,
            "context_length": spec.max_position_embeddings, "sliding_window": spec.sliding_window,
            "tie_word_embeddings": spec.tie_word_embeddings,
        },
        "graph": graph.to_manifest(),
        "quantization": quant.to_manifest(),
        "tokenizer": {
            "file": TOKENIZER_FILE, "bos_token_id": spec.bos_token_id if spec.bos_token_id is not None
            else (tok.token_to_id(source.bos_token) if source.bos_token else None),
            "eos_token_ids": eos, "pad_token_id": spec.pad_token_id,
            "bos_token": source.bos_token, "eos_token": source.eos_token,
            "chat_template_file": CHAT_TEMPLATE_FILE if source.chat_template else None,
            "chat_template_origin": source.chat_template_origin if source.chat_template else None,
        },
        "generation": {"max_new_tokens": 256, "source_defaults": source.generation},
        "source": {"kind": source.kind, "name": source.path.name, "description": source.describe()},
        "validation": validation,
    }
