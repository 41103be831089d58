"""`edge-infer bench` and `edge-infer eval` (placeholder until written)."""

import click


@click.command()
def bench():
    """Benchmark a model (being written)."""
    raise click.ClickException("not written yet")


@click.command(name="eval")
def evaluate():
    """Evaluate a model (being written)."""
    raise click.ClickException("not written yet")
