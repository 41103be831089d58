"""Command-line options shared by the commands that load a model (`run`, `chat`, `bench`, `serve`).

One definition each: the sampling options of `run` and `chat`, the speculative decoding options of
all four, and loading a model with its device plan printed. click only at import: the runtime
loads inside the functions.
"""

from __future__ import annotations

import click


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
                     help="auto, cpu, cuda, dml, qnn, coreml, openvino (the best OpenVINO device present) or openvino:NPU|GPU|CPU (see `edge-infer devices`)."),
        click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads [default: cores]."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def sampling_from_options(kw: dict):
    """Pop the sampling options from kw; returns checked SamplingParams."""
    from edge_infer.runtime.sampling import SamplingParams

    keys = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
            "frequency_penalty", "seed")
    params = SamplingParams(**{k: kw.pop(k) for k in keys})
    params.validate()
    return params


def chat_template_option(f):
    """--chat-template for the commands that load a model (`run`, `chat`, `serve`)."""
    return click.option("--chat-template", default=None, metavar="NAME|FILE",
                        help="Chat template in place of the model's own: a built-in one (chatml, llama2, llama3, "
                             "mistral, gemma, phi3, zephyr) or a Jinja file.")(f)


def load_model(path: str, device: str, threads: int | None, quiet: bool = False, shared_threads: bool = False,
               chat_template: str | None = None):
    """Load a model folder; unless `quiet`, say on stderr what runs it and why."""
    from edge_infer.runtime.model import load

    model = load(path, device=device, threads=threads, shared_threads=shared_threads, chat_template=chat_template)
    if not quiet:
        click.echo(f"[{model.manifest.geometry.architecture} {model.manifest.quant_scheme}, "
                   f"device {model.describe_device()}]", err=True)
        skipped = [r.split(":")[0] for r in model.plan.reasons if ": skipped" in r]
        chosen = [r for r in model.plan.reasons if ": skipped" not in r]
        for reason in chosen:
            click.echo(f"  {reason}", err=True)
        if skipped:
            click.echo(f"  skipped {', '.join(skipped)} (why: `edge-infer devices`)", err=True)
        click.echo(f"  padding {model.describe_padding()}", err=True)
        click.echo(f"  threads {model.session.get_session_options().intra_op_num_threads or 'shared'}, "
                   f"spinning {model.describe_spinning()}", err=True)
    return model


def speculative_options(f):
    """Speculative decoding options shared by `run`, `chat`, `bench` and `serve`."""
    opts = [
        click.option("--speculative", type=click.Choice(["auto", "off", "lookup", "draft"]), default="auto",
                     show_default=True,
                     help="Guess tokens and verify them in one pass: lookup copies n-grams from the prompt, "
                          "draft asks --draft MODEL, auto is draft with --draft and lookup without, each "
                          "switching itself off while its guesses fail. The output is unchanged."),
        click.option("--draft", "draft_model", type=click.Path(), default=None,
                     help="Draft model folder (same tokenizer) for --speculative draft or auto."),
        click.option("--num-speculative", type=click.IntRange(1, 32), default=None,
                     help="Most guesses per pass [default: lookup 10, draft 8]; adapted to the acceptance rate."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def speculative_from_options(kw: dict, model, device: str, threads: int | None):
    """Pop the speculative options from kw; returns a SpeculativeConfig or None (off)."""
    from edge_infer.runtime.speculative import load_draft, speculative_config

    wants_shared_threads(kw)  # the checks, again, for callers that skipped them
    mode, path, n = kw.pop("speculative"), kw.pop("draft_model"), kw.pop("num_speculative")
    draft = load_draft(model, path, device=device, threads=threads) if path is not None else None
    return speculative_config(mode, draft=draft, num_speculative=n)


def wants_shared_threads(kw: dict) -> bool:
    """Check the speculative options before anything loads; True when the target should go on the
    process-wide thread pool (devices.providers.share_threads) because a draft model will join it."""
    from edge_infer.contract.errors import UserError

    mode, path = kw.get("speculative"), kw.get("draft_model")
    if path is not None and mode not in ("draft", "auto"):
        raise UserError(f"--draft is only used with --speculative draft or auto (speculation is {mode})")
    if mode == "draft" and path is None:
        raise UserError("--speculative draft needs a draft model: add --draft MODEL")
    return path is not None


def thinking_options(f):
    """--think/--no-think and --hide-thinking, for run and chat (reasoning models)."""
    f = click.option("--hide-thinking", is_flag=True,
                     help="Reasoning models: do not show the <think> text (shown dimmed by default).")(f)
    f = click.option("--think/--no-think", "think", default=None,
                     help="Reasoning models: turn thinking on or off (the template's enable_thinking) "
                          "[default: the template's].")(f)
    return f


def template_kwargs_from(think: bool | None) -> dict | None:
    return None if think is None else {"enable_thinking": think}


class ReplyPrinter:
    """Echoes a streamed reply to stdout: a reasoning model's thinking dimmed, or hidden."""

    def __init__(self, model, hide: bool, template_kwargs: dict | None = None):
        from edge_infer.runtime.reasoning import ReasoningSplitter, emits_thinking, opens_thinking

        template = model.chat_template
        self.splitter = None
        if emits_thinking(template):
            probe = template.render([{"role": "user", "content": "?"}], **(template_kwargs or {}))
            self.splitter = ReasoningSplitter(inside=opens_thinking(probe))
        self.hide = hide
        self.thinking = False  # the last thing shown was thinking (a newline separates it from the answer)

    def feed(self, text: str) -> None:
        self._show(self.splitter.feed(text) if self.splitter is not None else [("content", text)])

    def finish(self) -> None:
        if self.splitter is not None:
            self._show(self.splitter.finish())

    def _show(self, pieces: list[tuple[str, str]]) -> None:
        for kind, text in pieces:
            if kind == "reasoning":
                if not self.hide:
                    click.echo(click.style(text, dim=True), nl=False)
                    self.thinking = True
                continue
            if self.thinking:
                click.echo("\n")
                self.thinking = False
            click.echo(text, nl=False)
