"""`edge-infer devices`: the execution providers onnxruntime offers here, and what `--device` would pick.

Mounted by edge_infer/cli.py; onnxruntime loads inside the command.
"""

from __future__ import annotations

import click


@click.command()
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
