"""`edge-infer export` and `edge-infer quantize`: the commands that write a model folder.

`quantize` lives here, not in quantize/: it reads a folder through the runtime's manifest and
validates against it (export/validate.py), which the quantize package may not import. Both
commands take the same quantization options (`quant_options`). Mounted by edge_infer/cli.py;
only click at import, the export machinery loads inside each command.
"""

from __future__ import annotations

import click


def quant_options(f):
    """How to quantize weights: the options `export` and `quantize` share (quantize/config.py QuantConfig)."""
    opts = [
        click.option("--block-size", type=int, default=32, show_default=True, help="Quantization block size."),
        click.option("--symmetric/--asymmetric", default=False, show_default=True, help="Weight zero point."),
        click.option("--embeddings", type=click.Choice(["int8", "int4", "fp"]), default="int8", show_default=True,
                     help="Token embedding precision (shared with a tied lm_head)."),
        click.option("--lm-head", type=click.Choice(["auto", "int8", "int4", "fp", "rescore"]), default="auto",
                     show_default=True,
                     help="lm_head precision. rescore: scan a 4-bit copy of the vocabulary, then recompute the best "
                          "1024 logits from the 8-bit table (faster decode, near-int8 quality); auto: rescore for "
                          "vocabularies of 100k tokens or more, int8 below."),
        click.option("--accuracy-level", type=click.IntRange(0, 4), default=4, show_default=True,
                     help="MatMulNBits compute: 4 = int8 activations (fastest on CPU), 0 = float activations."),
        click.option("--rounding", type=click.Choice(["search", "rtn"]), default="search", show_default=True,
                     help="4-bit rounding of float weights: a searched least-squares scale per block (blocks of 16 "
                          "and 32), or round-to-nearest."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def destination(out: str | None, name: str | None):
    """The folder to write: -o's path, or the store's folder for --name (exactly one of them)."""
    from edge_infer.contract.errors import UserError
    from edge_infer.contract.model_store import folder_of

    if (out is None) == (name is None):
        raise UserError("say where the model goes: -o FOLDER, or --name NAME to keep it in the model store"
                        + (" (not both)" if out is not None else ""))
    return folder_of(name) if name is not None else out


@click.command()
@click.argument("src", type=click.Path(exists=False))
@click.option("-o", "--output", "out", default=None, type=click.Path(), help="Model folder to create.")
@click.option("--name", default=None, help="Write into the model store as NAME or NAME:TAG instead of -o "
              "(`edge-infer list`; $EDGE_INFER_HOME).")
@click.option("--quant", type=click.Choice(["fp32", "fp16", "int8", "int4"]), default="int4", show_default=True)
@click.option("--max-length", type=int, default=None, help="KV-cache length [default: min(4096, model context)].")
@quant_options
@click.option("--gguf-import", type=click.Choice(["folded", "exact", "mixed", "requantize", "lean"]), default="folded",
              show_default=True,
              help="GGUF Q4_1/Q4_K blocks: folded (the block residuals as extra columns of the weight, rounded "
                   "twice; Q6_K/Q5_0 8-bit blocks rounded again in blocks of 64), exact (the file's blocks as they "
                   "are, a float residual term per weight: slower), mixed (exact in the MLP, rounded again in "
                   "attention), requantize (all rounded again, wider blocks too), lean (folded, and Q6_K's "
                   "6-bit blocks rounded to 4 bits: fewer bytes per token, further from the file); see "
                   "benchmarks/QUALITY.md.")
@click.option("--profile", type=click.Choice(["default", "npu", "gpu"]), default="default", show_default=True,
              help="npu: standard ONNX ops and static shapes (prefill-chunk + decode graphs) for OpenVINO, QNN "
                   "and any provider; --quant fp32, int8 or int4 (DequantizeLinear blocks); --max-length "
                   "default 1024. gpu: the default graph with fp16 activations and KV cache (CUDA, DirectML), "
                   "MatMulNBits with fp16 scales, fp32 logits; --accuracy-level default 0.")
@click.option("--chunk", type=int, default=64, show_default=True, help="npu profile: prefill chunk length.")
@click.option("--kv-cache", type=click.Choice(["float", "int8", "int4"]), default="float", show_default=True,
              help="KV cache storage: float (the model's dtype), or int8 / int4 with per-channel scales "
                   "calibrated at export (a quarter / an eighth of fp32's memory; the manifest records the "
                   "perplexity cost on held-out text).")
@click.option("--chat-template", default=None, metavar="NAME|FILE",
              help="Store this chat template in place of the model's own: a built-in one (chatml, llama2, llama3, "
                   "mistral, gemma, phi3, zephyr) or a Jinja file [default: the model's; for a file without one, "
                   "its family's built-in template when the architecture names one].")
@click.option("--task", type=click.Choice(["auto", "generate", "embed"]), default="auto", show_default=True,
              help="embed: the final hidden state instead of logits, pooled and normalized as the folder's "
                   "sentence-transformers files say (edge_infer.embed, POST /v1/embeddings); auto: embed for "
                   "encoders (BERT, XLM-RoBERTa, ModernBERT, NomicBERT), generate otherwise.")
@click.option("--matryoshka/--no-matryoshka", default=None,
              help="embed: whether a prefix of the vector is an embedding too (requests may then ask for fewer "
                   "dimensions) [default: as the source's config says].")
@click.option("--no-validate", is_flag=True, help="Skip the comparison against the source / fp32.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def export(src, out, name, quant, max_length, block_size, symmetric, embeddings, lm_head, accuracy_level, rounding,
           gguf_import, profile, chunk, kv_cache, chat_template, task, matryoshka, no_validate, force, quiet):
    """Export a Hugging Face folder or a .gguf file to an ONNX model folder."""
    from edge_infer.contract.model_store import parse_name
    from edge_infer.export.export_folder import ExportOptions, export_model
    from edge_infer.export.progress import Progress

    if profile == "gpu" and click.get_current_context().get_parameter_source("accuracy_level") \
            == click.core.ParameterSource.DEFAULT:
        accuracy_level = 0  # GPU kernels compute MatMulNBits in fp16; level 4's int8 activations are a CPU path
    options = ExportOptions(quant=quant, max_length=max_length, block_size=block_size, symmetric=symmetric,
                            embeddings=embeddings, lm_head=lm_head, accuracy_level=accuracy_level,
                            rounding=rounding, gguf_import=gguf_import, validate=not no_validate,
                            force=force, profile=profile, chunk=chunk, kv_cache=kv_cache,
                            chat_template=chat_template, task=task, matryoshka=matryoshka)
    out = destination(out, name)
    export_model(src, out, options, Progress(quiet=quiet))
    if name is not None and not quiet:
        click.echo(f"stored as {parse_name(name)} ({out})", err=True)


@click.command()
@click.argument("model", type=click.Path())
@click.option("-o", "--output", "out", default=None, type=click.Path(), help="Model folder to create.")
@click.option("--name", default=None, help="Write into the model store as NAME or NAME:TAG instead of -o.")
@click.option("--quant", type=click.Choice(["int8", "int4"]), default="int4", show_default=True)
@quant_options
@click.option("--no-validate", is_flag=True, help="Skip the comparison against the input model.")
@click.option("--force", is_flag=True)
@click.option("-q", "--quiet", is_flag=True)
def quantize(model, out, name, quant, block_size, symmetric, embeddings, lm_head, accuracy_level, rounding,
             no_validate, force, quiet):
    """Quantize an exported fp32/fp16 model folder to int8 or int4 (MatMulNBits)."""
    from edge_infer.export.progress import Progress
    from edge_infer.export.quantize_exported import quantize_folder
    from edge_infer.quantize.config import QuantConfig

    config = QuantConfig.from_options(quant, block_size, symmetric, accuracy_level, embeddings, lm_head, rounding)
    quantize_folder(model, destination(out, name), config, validate=not no_validate, force=force,
                    progress=Progress(quiet=quiet))
