"""`edge-infer export SRC --task embed`: a model folder whose graph ends at the final hidden state.

Two kinds of source, one folder format (manifest `task: "embed"` plus an `embedding` record):
  - encoders (BERT, XLM-RoBERTa, ModernBERT, NomicBERT: export/encoders/), built by
    export/encoder_graph.py; exported this way whatever --task says, since they only embed;
  - decoders of any architecture the direct builder knows (Qwen3-Embedding, or any decoder in a
    pinch): export/graph.py with `head="hidden"`, the KV inputs kept so the same fused attention
    runs (the runtime feeds empty pasts).
Pooling and normalization come from the folder's sentence-transformers files (export/pooling.py)
and are applied by the runtime (runtime/embed.py). Weights stream to disk and are quantized the
way text-generation exports are (export/direct_route.py build_streamed), atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_infer.contract.embedding import TASK_EMBED, EmbeddingRecord
from edge_infer.contract.errors import UserError
from edge_infer.contract.graph_record import GraphRecord
from edge_infer.contract.model_folder import DATA_FILE, GRAPH_FILE, TOKENIZER_FILE, write_manifest
from edge_infer.contract.quantization import QuantRecord
from edge_infer.export.encoders import EncoderSpec, load_encoder, resolve_encoder_type
from edge_infer.export.progress import Progress

if TYPE_CHECKING:
    from edge_infer.export.export_folder import ExportOptions
    from edge_infer.export.sources import Source


def source_is_encoder(src: str | Path) -> bool:
    """Whether `src` is a Hugging Face folder of an encoder family we build (read from config.json only)."""
    config = Path(src) / "config.json"
    if not config.is_file():
        return False
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return False  # the regular route names the problem
    if resolve_encoder_type(model_type) is not None:
        return True
    from edge_infer.export.arch import ALIASES, SUPPORTED

    if ALIASES.get(model_type, model_type) in SUPPORTED:
        return False
    from edge_infer.export import embed_optimum

    return embed_optimum.supports(model_type)


def export_embedding(src: str | Path, out: str | Path, options: ExportOptions, progress: Progress) -> Path:
    from edge_infer.export.atomic import atomic_folder, check_target
    from edge_infer.export.direct_route import build_streamed
    from edge_infer.export.export_folder import FLOAT_DATA, ExportJob
    from edge_infer.export.sources import open_source

    if options.profile != "default" or options.kv_cache != "float":
        raise UserError("embedding exports take the default profile and a float KV cache: drop --profile / --kv-cache")
    out = Path(out)
    check_target(out, options.force)
    progress.stage(f"reading {src}")
    source = open_source(src)
    build = _build_for(source, options)
    if build.kind == "encoder" and options.quant == "fp16":
        raise UserError("encoder exports take --quant fp32, int8 or int4 (their activations stay fp32)")
    record = _record(source, build, options)  # before anything is built: an unsupported pipeline stops here
    progress.note(f"embedding export ({build.kind}, {build.route} route) of {build.model_type}: "
                  f"{build.num_layers} layers, hidden {build.hidden_size}, up to {build.max_tokens} tokens")
    with atomic_folder(out, options.force) as tmp:
        if build.route == "optimum":
            io, quant_info = _write_optimum(source, options, tmp, progress)
        else:
            job = ExportJob(source, build.spec, build.max_tokens, options, tmp, progress)
            io, quantized, _ = build_streamed(job, build.recipe, build.graph)
            quant_info = dict(quantized.details) if quantized is not None else {}
            (tmp / FLOAT_DATA).unlink(missing_ok=True)  # the float graph's own tensors
        source.tokenizer.save(str(tmp / TOKENIZER_FILE))
        quant = QuantRecord(options.quant, options.quant_config(), quant_info)
        write_manifest(tmp, _manifest_body(source, build, io, options, quant, record))
    progress.done(f"exported to {out} (embeddings: {record.pooling} pooling, "
                  f"{'normalized' if record.normalize else 'not normalized'}, {record.dimensions} dimensions)")
    return out


class _Build:
    """What differs between the routes: the spec, its weight recipe, its graph builder (none on the
    optimum route) and the geometry the manifest records."""

    def __init__(self, spec: Any, recipe: dict, graph, kind: str, max_tokens: int, kv_heads: int, head_dim: int,
                 route: str = "direct"):
        self.spec, self.recipe, self.graph, self.kind, self.max_tokens = spec, recipe, graph, kind, max_tokens
        self.route = route
        self.model_type, self.num_layers, self.hidden_size = spec.model_type, spec.num_layers, spec.hidden_size
        self.num_heads, self.kv_heads, self.head_dim = spec.num_heads, kv_heads, head_dim


def _build_for(source: Source, options: ExportOptions) -> _Build:
    """Our encoder builder, our decoder builder (--task embed), or optimum's feature-extraction export."""
    from edge_infer.export.arch import SUPPORTED
    from edge_infer.export.encoders import SUPPORTED as ENCODERS
    from edge_infer.export.export_folder import has_builder

    model_type = source.config.get("model_type")
    if resolve_encoder_type(model_type) is not None:
        return _encoder_build(source)
    if has_builder(source):
        return _decoder_build(source, options)
    from edge_infer.export import embed_optimum

    if not embed_optimum.supports(model_type):
        raise UserError(f"architecture '{model_type}' cannot be exported for embeddings: encoders "
                        f"{', '.join(ENCODERS)}, decoders {', '.join(SUPPORTED)} (--task embed), or what optimum-onnx "
                        "exports for feature extraction when the export extra is installed")
    g = embed_optimum.Geometry(source.path)
    return _Build(g, {}, None, "encoder", g.max_position_embeddings, g.num_heads, g.hidden_size // g.num_heads,
                  route="optimum")


def _write_optimum(source: Source, options: ExportOptions, tmp: Path, progress: Progress) -> tuple[Any, dict]:
    """optimum's graph, quantized by the same rewrite as ours, saved into `tmp`: (io, quantization details)."""
    from edge_infer.export import embed_optimum
    from edge_infer.export.export_folder import save_graph
    from edge_infer.export.graph import GraphIO

    if options.quant == "fp16":
        raise UserError("encoder exports take --quant fp32, int8 or int4 (their activations stay fp32)")
    model = embed_optimum.export_graph(source.path, progress)
    info: dict = {}
    config = options.quant_config()
    if config is not None:
        from edge_infer.quantize.rewrite import quantize_graph, quantize_summary

        progress.stage(f"quantizing to {options.quant}")
        model = quantize_graph(model, config)
        info = {"summary": quantize_summary(model)}
    progress.stage("writing model")
    save_graph(model, tmp)
    inits = {t.name for t in model.graph.initializer}
    return GraphIO(tuple(i.name for i in model.graph.input if i.name not in inits),
                   tuple(o.name for o in model.graph.output)), info


def _encoder_build(source: Source) -> _Build:
    from edge_infer.export.encoder_graph import build_encoder

    arch = load_encoder(source.config.get("model_type"))
    spec: EncoderSpec = arch.spec(source.config)
    recipe = arch.recipe(spec, source.weights.names())
    # fp32 activations whatever --quant says (fp16 rounds the attention's -1e9 mask, and encoders are small)
    return _Build(spec, recipe, lambda weights, dtype, store: build_encoder(spec, weights, store), "encoder",
                  spec.max_position_embeddings, spec.num_heads, spec.head_dim)


def _decoder_build(source: Source, options: ExportOptions) -> _Build:
    from edge_infer.export.arch import load_arch
    from edge_infer.export.export_folder import resolve_max_length
    from edge_infer.export.graph import build_decoder

    arch = load_arch(source.config.get("model_type"))
    spec = arch.spec(source.config)
    max_length = resolve_max_length(spec, options.max_length)

    def graph(weights, dtype, store):
        return build_decoder(spec, weights, max_length, dtype=dtype, store=store, head="hidden")

    recipe = {k: v for k, v in arch.recipe(spec, source.config).items() if k != "lm_head.weight"}
    return _Build(spec, recipe, graph, "decoder", max_length, spec.num_kv_heads, spec.head_dim)


def _record(source: Source, build: _Build, options: ExportOptions) -> EmbeddingRecord:
    from edge_infer.export.pooling import embedding_record

    if source.kind != "hf":
        return EmbeddingRecord(pooling="last_token", normalize=True, dimensions=build.hidden_size,
                               matryoshka=bool(options.matryoshka), max_tokens=build.max_tokens, kind=build.kind)
    return embedding_record(source.path, source.config, build.hidden_size, build.max_tokens, build.kind,
                            matryoshka=options.matryoshka)


def _manifest_body(source: Source, build: _Build, io, options: ExportOptions, quant: QuantRecord,
                   record: EmbeddingRecord) -> dict[str, Any]:
    from edge_infer.export.export_folder import VERSION

    pad = getattr(build.spec, "pad_token_id", None)
    return {
        "created_by": f"edge-infer {VERSION}",
        "task": TASK_EMBED,
        "model": {"architecture": build.model_type, "num_layers": build.num_layers, "num_heads": build.num_heads,
                  "num_kv_heads": build.kv_heads, "head_dim": build.head_dim, "hidden_size": build.hidden_size,
                  "vocab_size": build.spec.vocab_size, "max_length": build.max_tokens,
                  "context_length": build.spec.max_position_embeddings},
        "graph": GraphRecord(GRAPH_FILE, io.inputs, io.outputs, dtype=_dtype(build, options),
                             data_file=DATA_FILE, route=build.route,
                             ops=("optimum-onnx feature-extraction export" if build.route == "optimum" else
                                  "standard ONNX ops" if build.kind == "encoder" else
                                  "com.microsoft GroupQueryAttention (empty past), SkipSimplifiedLayerNormalization")
                             + ", MatMulNBits where quantized").to_manifest(),
        "embedding": record.to_manifest(),
        "quantization": quant.to_manifest(),
        "tokenizer": {"file": TOKENIZER_FILE, "bos_token_id": None, "eos_token_ids": list(source.eos_token_ids),
                      "pad_token_id": pad if isinstance(pad, int) and 0 <= pad < build.spec.vocab_size else None,
                      "bos_token": source.bos_token, "eos_token": source.eos_token, "chat_template_file": None},
        "source": {"kind": source.kind, "name": source.path.name, "description": source.describe()},
        "validation": {},
    }


def _dtype(build: _Build, options: ExportOptions) -> str:
    return options.dtype if build.kind == "decoder" else "fp32"
