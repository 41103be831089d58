"""`edge-infer bench` and `edge-infer eval`: the numbers behind every speed and quality claim.

The measuring itself lives in bench/measure.py (shared with benchmarks/, which runs the
same code against onnxruntime-genai and llama.cpp); this file is options and printing.
Mounted by edge_infer/cli.py; heavy modules are imported inside the commands.
"""

from __future__ import annotations

import json

import click

from edge_infer.runtime.cli_options import speculative_from_options, speculative_options, wants_shared_threads


def _lengths(ctx, param, value: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated token counts such as 128,1024, got '{value}'") from None
    if not out or any(n < 1 for n in out):
        raise click.BadParameter(f"expected positive token counts such as 128,1024, got '{value}'")
    return out


def _load(path: str, device: str, threads: int | None, shared_threads: bool = False):
    from edge_infer.runtime.model import load

    return load(path, device=device, threads=threads, shared_threads=shared_threads)


def _threads(threads: int | None) -> int:
    from edge_infer.devices.providers import physical_cores

    return threads or physical_cores()


def _model_info(model, path: str) -> dict:
    m = model.manifest
    return {"path": path, "architecture": m.geometry.architecture, "weights": m.quantization.describe(accuracy=True),
            "kv_cache": m.kv_dtype,
            "source": m.source.get("description"), "device": model.describe_device(),
            "padding": model.describe_padding(), "spinning": model.describe_spinning()}


def _machine_line(machine: dict) -> str:
    return (f"{machine['cpu']}, {machine['logical_cores']} logical cores ({machine['usable_cores']} usable), "
            f"{machine['memory_gib']} GiB; {machine['os']}; onnxruntime {machine['onnxruntime']}, "
            f"{machine['threads']} threads")


@click.command()
@click.argument("model", type=click.Path())
@click.option("--prompt-tokens", "lengths", default="128,1024", show_default=True, callback=_lengths,
              help="Prompt lengths in tokens, comma-separated.")
@click.option("--new-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="Tokens to generate per run (greedy, eos ignored).")
@click.option("--runs", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed runs per prompt length; medians are reported.")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True,
              help="Untimed runs per prompt length first.")
@click.option("--text", "text_path", type=click.Path(), default=None,
              help="Text file or folder of .txt files the prompts are cut from [default: the shipped benchmarks/text].")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads [default: physical cores].")
@click.option("--device", default="auto", show_default=True,
              help="auto, cpu, cuda, dml, ... (see `edge-infer devices`).")
@click.option("--json", "as_json", is_flag=True, help="Print every run and the medians as JSON.")
@speculative_options
def bench(model, lengths, new_tokens, runs, warmup, text_path, threads, device, as_json, **speculative_kw):
    """Time to first token, prefill and decode speed, inter-token latency and peak memory of MODEL.

    Prompts are real text cut to exactly each length; the first token comes from the prefill
    (runtime.generate.prefill, chunked as in `edge-infer run`), then new-tokens - 1 greedy decode steps.
    With --speculative, plain and speculative runs alternate and both are reported, with the
    speed ratio, the acceptance rate and whether the ids were identical."""
    import numpy as np

    from edge_infer.bench import measure
    from edge_infer.contract.errors import UserError
    from edge_infer.runtime.speculative import SpecStats

    text, text_desc = measure.read_text(text_path)
    m = _load(model, device, threads, shared_threads=wants_shared_threads(speculative_kw))
    for n in lengths:
        if n + new_tokens > m.max_length:
            raise UserError(f"prompt {n} + {new_tokens} new tokens exceeds the model's max_length {m.max_length}; "
                            f"use shorter --prompt-tokens or re-export with a larger --max-length")
    ids = m.tokenizer.encode(text, add_special_tokens=True)
    prefill, step = measure.edge_engine(m, new_tokens)
    speculative = speculative_from_options(speculative_kw, m, device, threads)
    spec_tokens = measure.edge_speculative(m, speculative, new_tokens) if speculative is not None else None
    machine = measure.describe_machine(_threads(threads))
    report = {"machine": machine, "model": _model_info(m, model),
              "settings": {"new_tokens": new_tokens, "runs": runs, "warmup": warmup, "text": text_desc,
                           "text_tokens": len(ids), "sampling": "greedy, eos ignored",
                           "speculative": _spec_settings(speculative)},
              "results": []}
    for n in lengths:
        prompt = measure.prompt_ids(ids, n)
        for _ in range(warmup):
            measure.time_generation(prefill, step, prompt, new_tokens)
            if spec_tokens is not None:
                measure.time_tokens(spec_tokens(prompt, SpecStats()), n, new_tokens)
        timed, spec = [], []
        for r in range(runs):  # plain and speculative alternate, so a noisy machine hits both alike
            plain_ids, spec_ids, stats = [], [], SpecStats()
            timed.append(measure.time_tokens(measure.step_tokens(prefill, step, prompt, new_tokens), n, new_tokens,
                                             keep=plain_ids))
            line = f"  prompt {n}: run {r + 1}/{runs} decode {timed[-1].decode_tok_s:.1f} tok/s"
            if spec_tokens is not None:
                run = measure.time_tokens(spec_tokens(prompt, stats), n, new_tokens, keep=spec_ids)
                spec.append({**run.as_dict(), "acceptance_rate": stats.acceptance_rate,
                             "tokens_per_target_pass": (new_tokens - 1) / max(stats.target_passes, 1),
                             "identical": spec_ids == plain_ids})
                line += f", speculative {run.decode_tok_s:.1f} tok/s"
            if not as_json:
                click.echo(line, err=True)
        result = {"prompt_tokens": n, "new_tokens": new_tokens, "repeated_text": n > len(ids),
                  "median": measure.medians(timed), "runs": [t.as_dict() for t in timed]}
        if spec:
            result["speculative"] = {"median": measure.medians(spec), "runs": spec,
                                     "acceptance_rate": float(np.median([x["acceptance_rate"] for x in spec])),
                                     "tokens_per_target_pass":
                                         float(np.median([x["tokens_per_target_pass"] for x in spec])),
                                     "identical_runs": sum(x["identical"] for x in spec)}
        report["results"].append(result)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    _print_bench(report)


def _spec_settings(config) -> dict | None:
    if config is None:
        return None
    return {"mode": config.mode, "num_speculative": config.max_guesses,
            "draft": config.draft.manifest.quant_scheme if config.draft is not None else None}


def _print_bench(report: dict) -> None:
    s = report["settings"]
    click.echo(f"machine  {_machine_line(report['machine'])}")
    mi = report["model"]
    click.echo(f"model    {mi['path']}: {mi['architecture']} {mi['weights']}, KV cache {mi['kv_cache']}, device {mi['device']}")
    click.echo(f"padding  {mi['padding']}")
    click.echo(f"prompts  {s['text']}, {s['text_tokens']} tokens; {s['sampling']}; "
               f"medians of {s['runs']} runs after {s['warmup']} warmup")
    click.echo()
    click.echo(f"{'prompt':>7}{'new':>6}{'TTFT ms':>10}{'prefill tok/s':>15}{'decode tok/s':>14}"
               f"{'ITL p50 ms':>12}{'ITL p95 ms':>12}{'peak RSS MiB':>14}")
    for r in report["results"]:
        md = r["median"]
        rss = f"{md['peak_rss_mib']:.0f}" if md["peak_rss_mib"] is not None else "?"
        click.echo(f"{r['prompt_tokens']:>7}{r['new_tokens']:>6}{md['ttft_s'] * 1e3:>10.1f}"
                   f"{md['prefill_tok_s']:>15.1f}{md['decode_tok_s']:>14.1f}{md['itl_p50_ms']:>12.2f}"
                   f"{md['itl_p95_ms']:>12.2f}{rss:>14}")
    click.echo("(peak RSS is the whole process's peak after that prompt length's runs)")
    spec = s.get("speculative")
    if not spec:
        return
    draft = f", draft {spec['draft']}" if spec["draft"] else ""
    click.echo()
    click.echo(f"speculative {spec['mode']}{draft} (at most {spec['num_speculative']} guesses per pass), "
               f"alternating with the plain runs above:")
    click.echo(f"{'prompt':>7}{'decode tok/s':>14}{'vs plain':>10}{'accepted':>10}{'tok/pass':>10}"
               f"{'identical ids':>15}")
    for r in report["results"]:
        sp = r["speculative"]
        rate = sp["median"]["decode_tok_s"]
        click.echo(f"{r['prompt_tokens']:>7}{rate:>14.1f}{rate / r['median']['decode_tok_s']:>9.2f}x"
                   f"{sp['acceptance_rate']:>10.0%}{sp['tokens_per_target_pass']:>10.2f}"
                   f"{sp['identical_runs']:>9}/{len(sp['runs'])} runs")


@click.command(name="eval")
@click.argument("model", type=click.Path())
@click.option("--text", "text_path", type=click.Path(), default=None,
              help="Text file or folder of .txt files to score [default: the shipped benchmarks/text].")
@click.option("--reference", type=click.Path(), default=None,
              help="A model folder with the same vocabulary (e.g. the fp32 export): adds top-1 agreement and "
                   "mean KL(reference || model).")
@click.option("--window", type=click.IntRange(min=2), default=512, show_default=True,
              help="Tokens per scoring window (context of at most window - 1).")
@click.option("--stride", type=click.IntRange(min=1), default=256, show_default=True,
              help="Window step; each window scores only the tokens no earlier window scored.")
@click.option("--max-tokens", type=click.IntRange(min=2), default=None, help="Score only the text's first N tokens.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads [default: physical cores].")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def evaluate(model, text_path, reference, window, stride, max_tokens, threads, device, as_json):
    """Perplexity of MODEL over a text (strided windows); with --reference, agreement and KL divergence."""
    import time

    from edge_infer.bench import measure
    from edge_infer.contract.errors import UserError

    if stride >= window:
        raise UserError(f"--stride {stride} must be smaller than --window {window}: each window needs context "
                        "before the first token it scores")
    text, text_desc = measure.read_text(text_path)
    m = _load(model, device, threads)
    if window > m.max_length:
        raise UserError(f"--window {window} exceeds the model's max_length {m.max_length}")
    ids = m.tokenizer.encode(text, add_special_tokens=True)
    if max_tokens:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise UserError(f"{text_desc}: the text is {len(ids)} token(s); at least 2 are needed")
    ref = ref_fn = None
    notes = []
    if reference:
        ref = _load(reference, device, threads)
        if ref.manifest.geometry.vocab_size != m.manifest.geometry.vocab_size:
            raise UserError(f"--reference {reference} has a vocabulary of {ref.manifest.geometry.vocab_size}, "
                            f"the model {m.manifest.geometry.vocab_size}: KL needs the same vocabulary")
        if window > ref.max_length:
            raise UserError(f"--window {window} exceeds the reference's max_length {ref.max_length}")
        if ref.tokenizer.encode(text, add_special_tokens=True)[:len(ids)] != ids:
            notes.append("the reference tokenizes the text differently; both are scored on the model's ids")
        ref_fn = measure.edge_logits(ref)

    def progress(done: int, total: int) -> None:
        click.echo(f"\r  window {done}/{total}", nl=done == total, err=True)

    start = time.perf_counter()
    q = measure.evaluate(measure.edge_logits(m), ids, window, stride, reference=ref_fn, progress=progress)
    report = {"model": _model_info(m, model), "text": text_desc, "window": window, "stride": stride,
              **q.as_dict(), "seconds": round(time.perf_counter() - start, 1),
              "machine": measure.describe_machine(_threads(threads))}
    if ref is not None:
        report["reference"] = _model_info(ref, reference)
    if notes:
        report["notes"] = notes
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"model       {model}: {report['model']['weights']}, KV cache {report['model']['kv_cache']}")
    click.echo(f"text        {text_desc}: {q.tokens} tokens, {q.scored} scored in {q.windows} windows "
               f"of {window} (stride {stride})")
    click.echo(f"perplexity  {q.perplexity:.4f}  (mean NLL {q.nll_mean:.4f} nats/token)")
    if ref is not None:
        click.echo(f"reference   {reference}: {report['reference']['weights']}, perplexity "
                   f"{q.reference_perplexity:.4f} (ratio {q.perplexity / q.reference_perplexity:.4f})")
        click.echo(f"agreement   top-1 {q.top1_agreement * 100:.2f}%, mean KL(reference || model) "
                   f"{q.kl_mean:.5f} nats (p99 {q.kl_p99:.4f})")
    for n in notes:
        click.echo(f"note        {n}", err=True)
