"""`edge-infer devices`: the execution providers onnxruntime offers here, what `--device` would pick,
and what the batch invariance probe has measured on this machine.

Mounted by edge_infer/cli.py; onnxruntime loads inside the command.
"""

from __future__ import annotations

import click


@click.command()
@click.option("--device", default="auto", show_default=True, help="Show the plan for this request.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="The thread count whose probe results to show [default: physical cores].")
def devices(device, threads):
    """List execution providers and what `--device auto` would choose, with reasons."""
    from edge_infer.devices import ModelTraits, available_providers, describe, resolve
    from edge_infer.devices.installs import collision, describe_installs, imported_init, onnxruntime_installs

    installs = onnxruntime_installs()
    for line in describe_installs(installs, imported_init()):
        click.echo(line)
    problem = collision(installs)
    if problem:
        click.echo(f"problem: {problem}\n", err=True)
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
    _runtime_features()
    _invariance(device, threads)
    if problem:
        raise SystemExit(1)  # the table is printed; the install still needs fixing


def _runtime_features() -> None:
    """What this onnxruntime release supports of the features that need a newer one."""
    from edge_infer.devices.capabilities import features
    from edge_infer.devices.ort import ort

    on = features()["ragged_rows"]
    click.echo(f"\nonnxruntime {ort.__version__}: GroupQueryAttention query_seqlens "
               + ("yes: exports load model.onnx; batched rows of different widths (server speculation) on" if on
                  else "no (1.32 has it): exports load model.compat.onnx; batched server rows run one id each, "
                       "without speculation; speculation and batch invariance at batch 1"))


def _invariance(device: str, threads: int | None) -> None:
    """The probe's verdicts cached for this machine, and the padding a model of those kernels gets."""
    from edge_infer.devices import ModelTraits, available_providers, physical_cores, resolve
    from edge_infer.devices.padding import choose
    from edge_infer.devices.probe_cache import cached_results, cpu_identity

    try:
        plan = resolve(device, available_providers(), ModelTraits(contrib_ops=True))
    except Exception:
        return
    count = threads or physical_cores()
    path, found = cached_results(plan.session_providers(), count)
    click.echo(f"\nbatch invariance on {cpu_identity()['cpu']} ({plan.device}, {count} threads), "
               f"probed kernels cached in {path}:")
    if not found:
        click.echo("  none probed yet: loading a model (or `edge-infer inspect MODEL`) probes its kernels")
        return
    for described, result in found:
        click.echo(f"  {described}: {result.verdict}" + (f" ({result.detail})" if result.detail else ""))
    click.echo(f"  padding for a model of all these kernels: {choose([r for _, r in found], 'auto').describe()}")
