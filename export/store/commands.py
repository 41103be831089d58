"""`edge-infer list`, `rm`, `cp`, `pack`, `import` and `pull`: the model store's commands (`show` is
`inspect` under a second name, mounted by edge_infer/cli.py). Only click at import."""

from __future__ import annotations

import click


@click.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per model.")
def list_models(as_json):
    """List the models in the store ($EDGE_INFER_HOME)."""
    import dataclasses
    import json

    from edge_infer.contract.model_store import models_root
    from edge_infer.export.store.catalog import entries, human_bytes

    rows = entries()
    if as_json:
        for e in rows:
            click.echo(json.dumps({**dataclasses.asdict(e), "name": str(e.name), "folder": str(e.folder)}))
        return
    if not rows:
        click.echo(f"no models in {models_root()}; add one with `edge-infer export SRC --name NAME` "
                   "or `edge-infer pull hf:ORG/REPO`", err=True)
        return
    table = [("NAME", "ARCH", "QUANT", "SIZE", "KV/SEQ", "SOURCE")]
    for e in rows:
        arch = e.architecture + (" (embed)" if e.task == "embed" else "")
        kv = "-" if e.task == "embed" else human_bytes(e.kv_bytes)
        table.append((str(e.name), arch, e.quantization, human_bytes(e.size_bytes), kv,
                      e.source if e.problem is None else f"unreadable: {e.problem}"))
    widths = [max(len(r[i]) for r in table) for i in range(5)]
    for r in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[5])


@click.command(name="rm")
@click.argument("names", nargs=-1, required=True)
def remove(names):
    """Remove models from the store."""
    from edge_infer.export.store.catalog import remove as remove_model

    for name in names:
        click.echo(f"removed {name} ({remove_model(name)})", err=True)


@click.command(name="cp")
@click.argument("src")
@click.argument("dst")
@click.option("--force", is_flag=True, help="Replace DST if the store has it.")
def copy(src, dst, force):
    """Copy a stored model (or a model folder) to a new name in the store."""
    from edge_infer.export.store.catalog import copy as copy_model

    click.echo(f"copied {src} to {dst} ({copy_model(src, dst, force)})", err=True)


@click.command()
@click.argument("model")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Replace FILE if it exists.")
def pack(model, file, force):
    """Write MODEL (a name or a folder) to one tar archive FILE (.tar.gz compresses) for `import`."""
    from edge_infer.export.store.archive import pack as pack_model

    click.echo(f"packed {model} into {pack_model(model, file, force)}", err=True)


@click.command(name="import")
@click.argument("path", type=click.Path())
@click.option("--name", default=None, help="Store it as NAME[:TAG] [default: the name it was packed under].")
@click.option("--force", is_flag=True, help="Replace a stored model of that name.")
def import_(path, name, force):
    """Import an archive from `pack`, or a model folder, into the store; every file's sha256 is checked
    against the manifest and a mismatch leaves nothing behind."""
    from edge_infer.contract.model_store import folder_of
    from edge_infer.export.store.archive import import_model

    target = import_model(path, name, force)
    click.echo(f"imported {target} ({folder_of(target)}), every file's sha256 verified", err=True)


@click.command()
@click.argument("ref")
@click.option("--name", default=None, help="Store it as NAME[:TAG] [default: REPO, tagged with the GGUF file].")
@click.option("--revision", default=None, help="A branch, tag or commit of the repository [default: main].")
@click.option("--quant", type=click.Choice(["fp32", "fp16", "int8", "int4"]), default="int4", show_default=True)
@click.option("--max-length", type=int, default=None, help="KV-cache length [default: min(4096, model context)].")
@click.option("--no-validate", is_flag=True, help="Skip the comparison against the source / fp32.")
@click.option("--force", is_flag=True, help="Replace a stored model of that name.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def pull(ref, name, revision, quant, max_length, no_validate, force, quiet):
    """Download hf:ORG/REPO (a checkpoint) or hf:ORG/REPO:FILE.gguf and export it into the store
    (needs the hub extra; HF_HUB_OFFLINE=1 reads only the local hub cache)."""
    from edge_infer.export.export_folder import ExportOptions
    from edge_infer.export.progress import Progress
    from edge_infer.export.store.pull import pull as pull_model

    options = ExportOptions(quant=quant, max_length=max_length, validate=not no_validate, force=force)
    target = pull_model(ref, name, options, Progress(quiet=quiet), revision)
    click.echo(f"stored as {target}", err=True)
