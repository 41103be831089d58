"""`edge-infer serve` (placeholder until written)."""

import click


@click.command()
def serve():
    """Serve a model (being written)."""
    raise click.ClickException("not written yet")
