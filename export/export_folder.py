"""`edge-infer export`: source -> ONNX decoder (+ quantization) -> validated, hashed model folder.

One skeleton, `export_model`, for every source: open it, pick its route, plan, then in a
temporary folder build, write the tokenizer, validate, finish and write the manifest. A route
per source (`Route`) does what differs:
    hf       a Hugging Face folder through our graph builder      (export/direct_route.py)
    gguf     a GGUF file through the same builder, its blocks kept (export/direct_route.py)
    optimum  an architecture we have no builder for: optimum-onnx  (export/optimum_route.py)
    npu      --profile npu: two static standard-op graphs          (export/npu_export.py)

The folder is written atomically: everything goes into a hidden temporary
sibling, the manifest is written last, and only then is the folder renamed into
place. An export that fails or is killed leaves nothing that loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from edge_infer.export.atomic import atomic_folder, check_target
from edge_infer.export.graph import GraphIO
from edge_infer.export.progress import Progress
from edge_infer.export.sources import Source, open_source, with_chat_template
from edge_infer.export.spec import DecoderSpec
from edge_infer.contract.errors import UserError
from edge_infer.contract.graph_record import GraphRecord, kv_cache_bytes
from edge_infer.contract.quantization import QuantRecord
from edge_infer.contract.model_folder import (CHAT_TEMPLATE_FILE, DATA_FILE, GRAPH_FILE, INLINE_BELOW, TOKENIZER_FILE,
                                         write_manifest)
from edge_infer.quantize.kv_cache import KV_CACHE_KINDS

if TYPE_CHECKING:
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
# the residuals folded into the weight (quantize/block_offsets.py fold_minimum); lean: folded, with the
# 6-bit blocks (Q6_K) rounded to the export's 4 bits (fewer bytes per token, further from the file).
GGUF_IMPORTS = ("folded", "exact", "mixed", "requantize", "lean")


@dataclass(frozen=True)
class ExportOptions:
    quant: str = "int4"
    max_length: int | None = None
    block_size: int = 32
    symmetric: bool = False
    accuracy_level: int = 4
    embeddings: str = "int8"  # int8 | int4 | fp
    lm_head: str = "auto"  # auto | int8 | int4 | fp | rescore (quantize/rescore.py; auto: rescore for big vocabularies)
    rounding: str = "search"  # 4-bit rounding of float weights: "search" (least-squares scales) or "rtn"
    # GGUF blocks with a minimum per block (Q4_1, Q4_K), see GGUF_IMPORTS: "folded" (the block
    # residuals as extra input columns of the weight, rounded once), "exact" (a float residual
    # branch per weight, slower decode), "mixed" (exact in the MLP, rounded again in attention) or
    # "requantize" (all rounded again with searched scales: fastest, lossy), or "lean" (folded, and
    # Q6_K's 6-bit blocks rounded to the export's bits from the file's values instead of kept at 8 bits).
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

    def quant_config(self, spec: object = None) -> QuantConfig | None:
        """The quantization settings these options ask for (None for fp32/fp16): what the rewrite gets
        and what the manifest records, `lm_head="auto"` decided for a DecoderSpec's vocabulary (an
        encoder's spec, or none, gets int8)."""
        from edge_infer.quantize.config import QuantConfig

        if self.quant not in ("int8", "int4"):
            return None
        config = QuantConfig.from_options(self.quant, self.block_size, self.symmetric, self.accuracy_level,
                                          self.embeddings, self.lm_head, self.rounding)
        if isinstance(spec, DecoderSpec):
            return config.for_vocab(spec.vocab_size, spec.tie_word_embeddings)
        return config.for_vocab(0, False)


@dataclass(frozen=True)
class ExportJob:
    """One export under way: what every route step gets."""

    source: Source
    spec: DecoderSpec
    max_length: int
    options: ExportOptions
    folder: Path  # the hidden temporary folder being written
    progress: Progress


@dataclass(frozen=True)
class Built:
    """What a route made in the folder, for the steps after it and the manifest."""

    graph: GraphRecord
    quant: QuantRecord
    reference: Any = None  # what validation compares the graph with; dropped by `finish`
    sections: dict[str, Any] = field(default_factory=dict)  # further manifest sections (kv_cache)


class Route:
    """What differs between sources; `export_model` calls plan, build, validate, finish and manifest in
    that order (validate only with options.validate)."""

    name = "direct"  # the manifest's graph.route

    def plan(self, source: Source, options: ExportOptions, progress: Progress) -> tuple[DecoderSpec, int]:
        """The decoder's geometry and the KV cache length; refuses what this route cannot export."""
        raise NotImplementedError

    def build(self, job: ExportJob) -> Built:
        """Write the graph(s) and their weights into job.folder."""
        raise NotImplementedError

    def validate(self, job: ExportJob, built: Built) -> dict[str, Any]:
        from edge_infer.export.validate import validate_export

        return validate_export(job.folder, job.source, job.spec, built.reference, job.max_length, job.progress)

    def finish(self, job: ExportJob, built: Built) -> Built:
        """After validation: drop the reference and anything only it needed."""
        return replace(built, reference=None)

    def manifest(self, job: ExportJob, built: Built, validation: dict[str, Any]) -> dict[str, Any]:
        return manifest_body(job, built, validation)


def export_model(src: str | Path, out: str | Path, options: ExportOptions = ExportOptions(),
                 progress: Progress | None = None) -> Path:
    """Export `src` (HF folder or .gguf) to the model folder `out`; returns its path."""
    options.check()
    progress = progress or Progress(quiet=True)
    if options.task != "generate":
        from edge_infer.export.embed_export import export_embedding, source_is_encoder

        if options.task == "embed" or source_is_encoder(src):
            return export_embedding(src, out, options, progress)
    elif _is_encoder(src):
        raise UserError(f"{src} is an encoder model: it embeds text and cannot generate it; export it with "
                        "--task embed (or auto)")
    out = Path(out)
    check_target(out, options.force)
    progress.stage(f"reading {src}")
    source = with_chat_template(open_source(src), options.chat_template, progress.note)
    route = route_for(source, options)
    spec, max_length = route.plan(source, options, progress)
    with atomic_folder(out, options.force) as tmp:
        job = ExportJob(source, spec, max_length, options, tmp, progress)
        built = route.build(job)
        write_tokenizer(source, tmp)
        validation = route.validate(job, built) if options.validate else {}
        built = route.finish(job, built)
        hashing = progress.stage("writing manifest", unit="B", key="manifest")
        write_manifest(tmp, route.manifest(job, built, validation), hashing.update)
    progress.done(f"exported to {out}")
    return out


def route_for(source: Source, options: ExportOptions) -> Route:
    """The route that exports `source` as `options` ask."""
    if options.profile == "npu":
        from edge_infer.export.npu_export import NpuRoute

        return NpuRoute()
    if builder_route(source) == "optimum":
        from edge_infer.export.optimum_route import OptimumRoute

        return OptimumRoute()
    from edge_infer.export.direct_route import DirectRoute, GgufRoute

    return GgufRoute() if source.kind == "gguf" else DirectRoute()


def _is_encoder(src: str | Path) -> bool:
    from edge_infer.export.embed_export import source_is_encoder

    return source_is_encoder(src)


def has_builder(source: Source) -> bool:
    """Whether our own graph builder (export/arch) takes `source`: its architecture has one, or it is a GGUF."""
    from edge_infer.export.arch import ALIASES, SUPPORTED

    model_type = str(source.config.get("model_type"))
    return ALIASES.get(model_type, model_type) in SUPPORTED or source.kind == "gguf"


def builder_route(source: Source) -> str:
    """"direct" (our fused graph builder) when the architecture has one, else "optimum"."""
    from edge_infer.export.arch import resolve_model_type

    model_type = source.config.get("model_type")
    if has_builder(source):
        return "direct"
    from edge_infer.export import optimum_route

    if not optimum_route.available() or not optimum_route.supports(model_type):
        resolve_model_type(model_type)  # raises the clear "not supported; supported: ..." error
    return "optimum"


def note_plan(progress: Progress, spec: DecoderSpec, route: str, max_length: int, kv_dtype: str) -> None:
    """The export output's lines on the architecture and what its KV cache costs."""
    progress.note(f"architecture {spec.model_type} ({route} route): {spec.num_layers} layers, hidden "
                  f"{spec.hidden_size}, {spec.num_heads} heads / {spec.num_kv_heads} kv heads, vocab {spec.vocab_size}")
    kv_mib = kv_cache_bytes(kv_dtype, spec.num_layers, spec.num_kv_heads, spec.head_dim, max_length) / 2**20
    progress.note(f"max_length {max_length} (model context {spec.max_position_embeddings}): "
                  f"KV cache {kv_mib:.0f} MiB per sequence")


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


def resolve_max_length(spec: DecoderSpec, requested: int | None, default: int = DEFAULT_MAX_LENGTH) -> int:
    context = spec.max_position_embeddings
    if requested is None:
        return min(default, context)
    if requested > context:
        raise UserError(f"--max-length {requested} exceeds the model's context of {context} positions")
    return requested


def save_graph(model: onnx.ModelProto, folder: Path) -> None:
    onnx.save_model(model, str(folder / GRAPH_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=INLINE_BELOW, convert_attribute=False)


def write_tokenizer(source: Source, folder: Path) -> None:
    source.tokenizer.save(str(folder / TOKENIZER_FILE))
    if source.chat_template:
        (folder / CHAT_TEMPLATE_FILE).write_text(source.chat_template, encoding="utf-8")


def manifest_body(job: ExportJob, built: Built, validation: dict[str, Any]) -> dict[str, Any]:
    """The manifest of `job`'s folder, less its envelope and file hashes (model_folder.write_manifest)."""
    spec, source, max_length = job.spec, job.source, job.max_length
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
        "graph": built.graph.to_manifest(),
        "quantization": built.quant.to_manifest(),
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
        **built.sections,
    }
