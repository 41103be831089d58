"""The `edge-infer` command line. Heavy modules are imported inside each command."""

from __future__ import annotations

import os
import sys

import click

from edge_infer.cli_speculative import speculative_from_options, speculative_options, wants_shared_threads

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1


class Group(click.Group):
    """Turns a UserError into one line on stderr and exit code 2; never a traceback for a user mistake."""

    def invoke(self, ctx):
        from edge_infer.contract.errors import UserError

        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except BaseException as e:  # also a library panic (tokenizers' PanicException is a BaseException)
            if os.environ.get("EDGE_INFER_DEBUG") or isinstance(e, GeneratorExit):
                raise
            click.echo(f"internal error: {type(e).__name__}: {e} (set EDGE_INFER_DEBUG=1 for a traceback)", err=True)
            sys.exit(EXIT_INTERNAL)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edge-infer")
def main():
    """On-device LLM inference: export, quantize and run models offline on onnxruntime."""


def sampling_options(f):
    """Options shared by `run` and `chat`."""
    opts = [
        click.option("--max-tokens", type=click.IntRange(min=1), default=None,
                     help="Most tokens to generate [default: 256, or what is left of the context]."),
        click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy."),
        click.option("--top-k", type=int, default=0, show_default=True, help="0 is off."),
        click.option("--top-p", type=float, default=1.0, show_default=True),
        click.option("--min-p", type=float, default=0.0, show_default=True),
        click.option("--repetition-penalty", type=float, default=1.0, show_default=True),
        click.option("--presence-penalty", type=float, default=0.0, show_default=True),
        click.option("--frequency-penalty", type=float, default=0.0, show_default=True),
        click.option("--seed", type=int, default=None, help="Makes sampling reproducible."),
        click.option("--stop", multiple=True, help="Stop string (repeatable); not included in the output."),
        click.option("--device", default="auto", show_default=True,
                     help="auto, cpu, cuda, dml, qnn, openvino or coreml (see `edge-infer devices`)."),
        click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads [default: cores]."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _sampling(kw: dict):
    from edge_infer.runtime.sampling import SamplingParams

    keys = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
            "frequency_penalty", "seed")
    params = SamplingParams(**{k: kw.pop(k) for k in keys})
    params.validate()
    return params


def _load(path: str, device: str, threads: int | None, quiet: bool = False, shared_threads: bool = False):
    import edge_infer

    model = edge_infer.load(path, device=device, threads=threads, shared_threads=shared_threads)
    if not quiet:
        click.echo(f"[{model.manifest.geometry.architecture} {model.manifest.quant_scheme}, "
                   f"device {model.describe_device()}]", err=True)
        skipped = [r.split(":")[0] for r in model.plan.reasons if ": skipped" in r]
        chosen = [r for r in model.plan.reasons if ": skipped" not in r]
        for reason in chosen:
            click.echo(f"  {reason}", err=True)
        if skipped:
            click.echo(f"  skipped {', '.join(skipped)} (why: `edge-infer devices`)", err=True)
    return model


@main.command()
@click.argument("src", type=click.Path(exists=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Model folder to create.")
@click.option("--quant", type=click.Choice(["fp32", "fp16", "int8", "int4"]), default="int4", show_default=True)
@click.option("--max-length", type=int, default=None, help="KV-cache length [default: min(4096, model context)].")
@click.option("--block-size", type=int, default=32, show_default=True, help="Quantization block size.")
@click.option("--symmetric/--asymmetric", default=False, show_default=True, help="Weight zero point.")
@click.option("--embeddings", type=click.Choice(["int8", "int4", "fp"]), default="int8", show_default=True,
              help="Token embedding precision (shared with a tied lm_head).")
@click.option("--lm-head", type=click.Choice(["int8", "int4", "fp"]), default="int8", show_default=True)
@click.option("--accuracy-level", type=click.IntRange(0, 4), default=4, show_default=True,
              help="MatMulNBits compute: 4 = int8 activations (fastest on CPU), 0 = float activations.")
@click.option("--rounding", type=click.Choice(["search", "rtn"]), default="search", show_default=True,
              help="4-bit rounding of float weights: a searched least-squares scale per block (blocks of 16 and "
                   "32), or round-to-nearest.")
@click.option("--gguf-import", type=click.Choice(["exact", "mixed", "requantize"]), default="exact",
              show_default=True,
              help="GGUF Q4_1/Q4_K blocks: exact (a residual term per weight), mixed (exact in the MLP, rounded "
                   "again in attention: 1.05-1.17x decode, perplexity 1.04x fp32), requantize (all rounded "
                   "again, wider blocks too: 1.3-1.4x decode, 1.14x); see benchmarks/QUALITY.md.")
@click.option("--profile", type=click.Choice(["default", "npu"]), default="default", show_default=True,
              help="npu: standard ONNX ops and static shapes (prefill-chunk + decode graphs) for OpenVINO, QNN "
                   "and any provider; --quant fp32, int8 or int4 (DequantizeLinear blocks); --max-length "
                   "default 1024.")
@click.option("--chunk", type=int, default=64, show_default=True, help="npu profile: prefill chunk length.")
@click.option("--no-validate", is_flag=True, help="Skip the comparison against the source / fp32.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def export(src, out, quant, max_length, block_size, symmetric, embeddings, lm_head, accuracy_level, rounding,
           gguf_import, profile, chunk, no_validate, force, quiet):
    """Export a Hugging Face folder or a .gguf file to an ONNX model folder."""
    from edge_infer.export.export_folder import ExportOptions, export_model
    from edge_infer.export.progress import Progress

    options = ExportOptions(quant=quant, max_length=max_length, block_size=block_size, symmetric=symmetric,
                            embeddings=embeddings, lm_head=lm_head, accuracy_level=accuracy_level,
                            rounding=rounding, gguf_import=gguf_import, validate=not no_validate,
                            force=force, profile=profile, chunk=chunk)
    export_model(src, out, options, Progress(quiet=quiet))


@main.command()
@click.argument("model", type=click.Path())
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Model folder to create.")
@click.option("--quant", type=click.Choice(["int8", "int4"]), default="int4", show_default=True)
@click.option("--block-size", type=int, default=32, show_default=True)
@click.option("--symmetric/--asymmetric", default=False, show_default=True)
@click.option("--embeddings", type=click.Choice(["int8", "int4", "fp"]), default="int8", show_default=True)
@click.option("--lm-head", type=click.Choice(["int8", "int4", "fp"]), default="int8", show_default=True)
@click.option("--accuracy-level", type=click.IntRange(0, 4), default=4, show_default=True)
@click.option("--rounding", type=click.Choice(["search", "rtn"]), default="search", show_default=True,
              help="4-bit rounding: a searched least-squares scale per block (blocks of 16 and 32), or "
                   "round-to-nearest.")
@click.option("--no-validate", is_flag=True, help="Skip the comparison against the input model.")
@click.option("--force", is_flag=True)
@click.option("-q", "--quiet", is_flag=True)
def quantize(model, out, quant, block_size, symmetric, embeddings, lm_head, accuracy_level, rounding, no_validate,
             force, quiet):
    """Quantize an exported fp32/fp16 model folder to int8 or int4 (MatMulNBits)."""
    from edge_infer.export.progress import Progress
    from edge_infer.export.quantize_exported import quantize_folder
    from edge_infer.quantize.config import QuantConfig

    config = QuantConfig(bits=4 if quant == "int4" else 8, block_size=block_size, symmetric=symmetric,
                         accuracy_level=accuracy_level, embeddings=embeddings, lm_head=lm_head, method=rounding)
    quantize_folder(model, out, config, validate=not no_validate, force=force, progress=Progress(quiet=quiet))


@main.command()
@click.argument("model", type=click.Path())
@click.argument("prompt")
@click.option("--raw", is_flag=True, help="Send PROMPT as plain text, not as a chat message.")
@click.option("--system", default=None, help="System message (chat models).")
@click.option("--stats/--no-stats", default=True, show_default=True, help="Timings on stderr.")
@click.option("--json-schema", "json_schema", type=click.Path(dir_okay=False), default=None,
              help="Constrain the output to JSON matching the schema in this file.")
@click.option("--json", "json_object", is_flag=True, help="Constrain the output to a JSON object.")
@click.option("--regex", default=None, help="Constrain the output to this regular expression.")
@click.option("--grammar", "lark", type=click.Path(dir_okay=False), default=None,
              help="Constrain the output to the Lark grammar in this file.")
@sampling_options
@speculative_options
def run(model, prompt, raw, system, stats, max_tokens, stop, device, threads, json_schema, json_object, regex, lark,
        **kw):
    """Generate from PROMPT ('-' reads stdin) and stream the text to stdout."""
    from edge_infer.runtime.generate import stream_generate
    from edge_infer.structured_cli import constraint_options

    from edge_infer.contract.errors import check_text

    sampling = _sampling(kw)
    structured = constraint_options(json_schema, json_object, regex, lark)
    if prompt == "-":
        prompt = _read_stdin()
    check_text(prompt, "PROMPT")  # an undecodable argv byte arrives as a lone surrogate: refused, exit 2
    for i, s in enumerate([system or ""] + list(stop)):
        check_text(s, "--system" if i == 0 else "--stop")
    m = _load(model, device, threads, quiet=not stats, shared_threads=wants_shared_threads(kw))
    speculative = speculative_from_options(kw, m, device, threads)
    messages = None
    if not raw and m.chat_template is not None:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    last = None
    for chunk in stream_generate(m, messages or prompt, max_tokens=max_tokens, sampling=sampling, stop=stop,
                                 speculative=speculative, **structured):
        if chunk.text:
            click.echo(chunk.text, nl=False)
        last = chunk
    click.echo()
    if stats and last and last.timings:
        _print_timings(last)


def _read_stdin() -> str:
    from edge_infer.contract.errors import UserError

    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"standard input is not valid UTF-8 (byte 0x{data[e.start]:02x} at {e.start})") from None


def _print_timings(chunk) -> None:
    t = chunk.timings
    click.echo(f"[{t.prompt_tokens} prompt tokens ({t.cached_tokens} cached), {t.generation_tokens} generated, "
               f"finish {chunk.finish_reason.value}; first token {t.time_to_first_token * 1000:.0f} ms, "
               f"prefill {t.prefill_tokens_per_s:.0f} tok/s, decode {t.decode_tokens_per_s:.1f} tok/s]", err=True)
    if t.speculative != "off":
        click.echo(f"[speculative {t.speculative}: {t.accepted_tokens} of {t.draft_tokens} guesses accepted "
                   f"({t.acceptance_rate:.0%}), {t.tokens_per_target_pass:.2f} tokens per target pass]", err=True)


@main.command()
@click.argument("model", type=click.Path())
@click.option("--system", default=None, help="System message.")
@click.option("--stats/--no-stats", default=False, show_default=True)
@sampling_options
@speculative_options
def chat(model, system, stats, max_tokens, stop, device, threads, **kw):
    """Interactive multi-turn chat using the model's chat template (/exit or Ctrl-D ends)."""
    from edge_infer.runtime.chat import ChatSession
    from edge_infer.contract.errors import UserError, check_text

    sampling = _sampling(kw)
    m = _load(model, device, threads, shared_threads=wants_shared_threads(kw))
    speculative = speculative_from_options(kw, m, device, threads)
    session = ChatSession(m, system=system, max_tokens=max_tokens, sampling=sampling, stop=stop,
                          speculative=speculative)
    click.echo("Type a message; /reset clears the history, /exit or Ctrl-D quits.", err=True)
    if hasattr(sys.stdin, "reconfigure"):  # a bad byte becomes a surrogate that check_text names; next lines still read
        sys.stdin.reconfigure(errors="surrogateescape")
    while True:
        try:
            line = input(">>> ")
        except UnicodeDecodeError:
            click.echo("error: that line is not valid UTF-8; type it again", err=True)
            continue
        except EOFError:
            click.echo()
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            session.reset()
            continue
        if not line.strip():
            continue
        try:
            check_text(line, "that message")
        except UserError as e:  # one bad line (an undecodable paste) does not end the chat
            click.echo(f"error: {e}", err=True)
            continue
        last = None
        for chunk in session.send(line):
            click.echo(chunk.text, nl=False)
            last = chunk
        click.echo()
        if session.dropped:
            click.echo(f"[{session.dropped} oldest messages dropped to fit the context]", err=True)
        if stats and last and last.timings:
            _print_timings(last)


@main.command()
@click.option("--device", default="auto", show_default=True, help="Show the plan for this request.")
def devices(device):
    """List execution providers and what `--device auto` would choose, with reasons."""
    from edge_infer.devices import ModelTraits, available_providers, describe, resolve

    rows = describe()
    click.echo(f"{'device':<10}{'provider':<28}{'available':<11}note")
    for r in rows:
        click.echo(f"{r.name:<10}{r.provider:<28}{r.available:<11}{r.note}")
    for dtype in ("fp32", "fp16"):
        try:
            plan = resolve(device, available_providers(), ModelTraits(dtype=dtype, contrib_ops=True))
        except Exception as e:
            click.echo(f"\n--device {device} for a {dtype} model: {e}")
            continue
        click.echo(f"\n--device {device} for a {dtype} model: {plan.device} ({', '.join(plan.providers)})")
        for reason in plan.reasons:
            click.echo(f"  {reason}")


@main.command()
@click.argument("model", type=click.Path())
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of every file.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest.")
def inspect(model, no_verify, as_json):
    """Summarize a model folder's manifest and verify every file's hash."""
    import json

    from edge_infer.runtime.manifest import load_manifest

    from edge_infer.runtime.model import check_external_data

    m = load_manifest(model, verify=not no_verify)
    check_external_data(m.folder / m.graph_file)  # the same file-safety checks as `run`
    if as_json:
        click.echo(json.dumps(m.raw, indent=2))
        return
    g = m.geometry
    click.echo(f"model       {m.folder}")
    click.echo(f"source      {m.source.get('description', '?')}")
    click.echo(f"arch        {g.architecture}: {g.num_layers} layers, hidden {g.hidden_size}, "
               f"{g.num_heads} heads / {g.num_kv_heads} kv heads, head_dim {g.head_dim}, vocab {g.vocab_size}")
    click.echo(f"context     max_length {g.max_length} (model context {g.context_length}); "
               f"KV cache {m.kv_bytes() / 2**20:.0f} MiB per sequence")
    q = m.quantization
    detail = f" (block {q.get('block_size')}, {'sym' if q.get('symmetric') else 'asym'}, " \
             f"embeddings {q.get('embeddings')}, lm_head {q.get('lm_head')})" if "bits" in q else ""
    click.echo(f"weights     {m.quant_scheme}{detail}")
    size = sum(f["size"] for f in m.files.values())
    click.echo(f"files       {len(m.files)} files, {size / 2**20:.1f} MiB"
               + ("" if no_verify else ", all sha256 verified"))
    if m.validation:
        click.echo(f"validation  {json.dumps(m.validation)}")


def _register() -> None:
    """Commands that live beside their own package (they import heavy modules inside the command)."""
    from edge_infer.cli_measure import bench, evaluate
    from edge_infer.serve.cli import serve

    main.add_command(bench)
    main.add_command(evaluate)
    main.add_command(serve)


_register()

if __name__ == "__main__":
    main()
