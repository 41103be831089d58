"""`edge-infer run`, `chat` and `inspect`: the commands that load and run a model folder.

Mounted by edge_infer/cli.py. Only click at import (`edge-infer --help` stays light): the
runtime loads inside each command.
"""

from __future__ import annotations

import sys

import click

from edge_infer.runtime.cli_options import (ReplyPrinter, chat_template_option, load_model, sampling_from_options,
                                            sampling_options, speculative_from_options, speculative_options,
                                            template_kwargs_from, thinking_options, wants_shared_threads)


@click.command()
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
@chat_template_option
@thinking_options
@sampling_options
@speculative_options
def run(model, prompt, raw, system, stats, max_tokens, stop, device, threads, json_schema, json_object, regex, lark,
        chat_template, think, hide_thinking, **kw):
    """Generate from PROMPT ('-' reads stdin) and stream the text to stdout."""
    from edge_infer.contract.errors import check_text
    from edge_infer.runtime.cli_constraints import constraint_options
    from edge_infer.runtime.generate import stream_generate

    sampling = sampling_from_options(kw)
    structured = constraint_options(json_schema, json_object, regex, lark)
    if prompt == "-":
        prompt = _read_stdin()
    check_text(prompt, "PROMPT")  # an undecodable argv byte arrives as a lone surrogate: refused, exit 2
    for i, s in enumerate([system or ""] + list(stop)):
        check_text(s, "--system" if i == 0 else "--stop")
    m = load_model(model, device, threads, quiet=not stats, shared_threads=wants_shared_threads(kw),
                   chat_template=chat_template)
    speculative = speculative_from_options(kw, m, device, threads)
    messages = None
    if not raw and m.chat_template is not None:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    elif not raw:
        click.echo("[this model has no chat template: PROMPT goes in as raw text; --chat-template NAME|FILE gives "
                   "it one]", err=True)
    last = None
    template_kwargs = template_kwargs_from(think) if messages else None
    printer = ReplyPrinter(m, hide_thinking, template_kwargs) if messages else None
    for chunk in stream_generate(m, messages or prompt, max_tokens=max_tokens, sampling=sampling, stop=stop,
                                 speculative=speculative, template_kwargs=template_kwargs, **structured):
        if chunk.text and printer is not None:
            printer.feed(chunk.text)
        elif chunk.text:
            click.echo(chunk.text, nl=False)
        last = chunk
    if printer is not None:
        printer.finish()
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


@click.command()
@click.argument("model", type=click.Path())
@click.option("--system", default=None, help="System message.")
@click.option("--stats/--no-stats", default=False, show_default=True)
@chat_template_option
@thinking_options
@sampling_options
@speculative_options
def chat(model, system, stats, max_tokens, stop, device, threads, chat_template, think, hide_thinking, **kw):
    """Interactive multi-turn chat using the model's chat template: line editing and history, multi-line
    messages between lines of \"\"\", /system, /set, /save, /load, /clear (/help lists them; /exit or Ctrl-D ends)."""
    from edge_infer.runtime.chat import ChatSession
    from edge_infer.runtime.repl import Repl

    sampling = sampling_from_options(kw)
    m = load_model(model, device, threads, shared_threads=wants_shared_threads(kw), chat_template=chat_template)
    speculative = speculative_from_options(kw, m, device, threads)
    session = ChatSession(m, system=system, max_tokens=max_tokens, sampling=sampling, stop=stop,
                          speculative=speculative, template_kwargs=template_kwargs_from(think))
    Repl(session, stats=_print_timings if stats else None, hide_thinking=hide_thinking).run()


@click.command()
@click.argument("model", type=click.Path())
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of every file.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest.")
@click.option("--device", default="auto", show_default=True, help="The device whose padding to show.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads [default: cores].")
@click.option("--padding", type=click.Choice(["auto", "attention", "rows", "off"]), default=None,
              help="Check a forced padding mode [default: auto, or $EDGE_INFER_PADDING].")
def inspect(model, no_verify, as_json, device, threads, padding):
    """Summarize a model folder's manifest, verify every file's hash, and say which padding keeps its
    passes batch-invariant on this machine (its kernels probed, or read from the probe cache)."""
    import json

    from edge_infer.devices import available_providers, resolve
    from edge_infer.devices.padding import requested
    from edge_infer.runtime.manifest import load_manifest
    from edge_infer.devices.capabilities import pick_header
    from edge_infer.runtime.model import check_external_data, choose_padding, describe_header, model_traits

    m = load_manifest(model, verify=not no_verify)
    header, skipped = pick_header(m.headers, str(m.folder))  # what `run` loads with this onnxruntime
    proto = check_external_data(m.folder / header.file)  # the same file-safety checks as `run`
    if as_json:
        click.echo(json.dumps(m.raw, indent=2))
        return
    g = m.geometry
    click.echo(f"model       {m.folder}")
    click.echo(f"source      {m.source.get('description', '?')}")
    click.echo(f"arch        {g.architecture}: {g.num_layers} layers, hidden {g.hidden_size}, "
               f"{g.num_heads} heads / {g.num_kv_heads} kv heads, head_dim {g.head_dim}, vocab {g.vocab_size}")
    if m.embedding is not None:  # an embedding model: no cache, template or padding to speak of
        _inspect_embedding(m, no_verify)
        return
    click.echo(f"context     max_length {g.max_length} (model context {g.context_length}); "
               f"KV cache {m.kv_dtype}, {m.kv_bytes() / 2**20:.0f} MiB per sequence")
    click.echo(f"weights     {m.quantization.describe()}")
    tok = m.tokenizer
    click.echo("template    " + ((tok.chat_template_origin or "the model's own") if tok.chat_template_file
                                 else "none: prompts go in as raw text (export --chat-template NAME|FILE)"))
    size = sum(f["size"] for f in m.files.values())
    click.echo(f"files       {len(m.files)} files, {size / 2**20:.1f} MiB"
               + ("" if no_verify else ", all sha256 verified"))
    if m.validation:
        click.echo(f"validation  {json.dumps(m.validation)}")
    click.echo(f"graph       {describe_header(m, header)}")
    for line in skipped:
        click.echo(f"              {line}")
    plan = resolve(device, available_providers(), model_traits(m))
    chosen = choose_padding(m, proto, plan, requested(padding), threads)
    click.echo(f"padding     {chosen.describe()} (device {plan.device})")
    for r in chosen.probes:
        click.echo(f"              {r.line()}")


def _inspect_embedding(m, no_verify: bool) -> None:
    e = m.embedding
    shorter = "any length down to 1 (Matryoshka)" if e.matryoshka else "no shorter vectors"
    click.echo(f"embedding   {e.kind}: {e.pooling} pooling, {'L2-normalized' if e.normalize else 'not normalized'}, "
               f"{e.dimensions} dimensions ({shorter}), texts up to {e.max_tokens} tokens"
               + (f", prompts {', '.join(name for name, _ in e.prompts)}" if e.prompts else ""))
    click.echo(f"weights     {m.quantization.describe()}")
    size = sum(f["size"] for f in m.files.values())
    click.echo(f"files       {len(m.files)} files, {size / 2**20:.1f} MiB" + ("" if no_verify else ", all sha256 verified"))
