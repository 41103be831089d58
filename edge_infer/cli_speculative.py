"""The speculative decoding options of `run`, `chat`, `bench` and `serve`: one definition for all four."""

from __future__ import annotations

import click


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
