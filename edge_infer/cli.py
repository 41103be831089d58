"""The `edge-infer` command line: the group, its error boundary, and the commands mounted from the
folders they drive (each imports only click at load; heavy modules inside the command):

    export, quantize      export/commands.py
    run, chat, inspect    runtime/commands.py
    devices               devices/commands.py
    bench, eval           bench/commands.py
    serve                 serve/commands.py
    list, rm, cp, pack,   export/store/commands.py (the model store; `show` is `inspect` by a second name)
    import, pull
"""

from __future__ import annotations

import os
import sys

import click

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


def _mount() -> None:
    from edge_infer.bench.commands import bench, evaluate
    from edge_infer.devices.commands import devices
    from edge_infer.export.commands import export, quantize
    from edge_infer.runtime.commands import chat, inspect, run
    from edge_infer.export.store.commands import copy, import_, list_models, pack, pull, remove
    from edge_infer.serve.commands import serve

    for command in (export, quantize, run, chat, devices, inspect, bench, evaluate, serve,
                    list_models, remove, copy, pack, import_, pull):
        main.add_command(command)
    main.add_command(inspect, name="show")


_mount()

if __name__ == "__main__":
    main()
