"""`edge_infer.export(src, out, **options)`: export from Python, with a progress callback for apps.

    import edge_infer
    edge_infer.export("model.gguf", "model-int4", quant="int4",
                      progress=lambda stage, done, total: print(stage, done, total))

The export package is callable (export/__init__.py), so this function is `edge_infer.export`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from edge_infer.contract.errors import UserError
from edge_infer.export.progress import Progress, ProgressCallback


def export(src: str | Path, out: str | Path, *, progress: ProgressCallback | None = None, quiet: bool = True,
           **options: Any) -> Path:
    """Export a Hugging Face folder or a .gguf file to the model folder `out`; returns its path.

    options: the fields of export_folder.ExportOptions (quant="int4", max_length, chat_template,
    validate, force, ...), as the `edge-infer export` options. progress(stage, done, total) sees
    each stage in order ("reading", "building", "quantizing", "writing", "validating", "manifest",
    ...), each ending with done == total. quiet=False also prints the stage lines and, on a
    terminal, the bars to stderr."""
    from edge_infer.export.export_folder import ExportOptions, export_model

    fields = {f.name for f in dataclasses.fields(ExportOptions)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise UserError(f"export() has no option {', '.join(map(repr, unknown))}; the options are "
                        f"{', '.join(sorted(fields))}")
    return export_model(src, out, ExportOptions(**options), Progress(quiet=quiet, callback=progress))
