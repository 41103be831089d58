"""Write a model folder atomically: a hidden temporary sibling, renamed into place at the end.

Whatever fails or is killed before the rename leaves no folder at the target
path; a folder that exists there is either the old one or the finished new one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from edge_infer.runtime.errors import UserError


def check_target(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise UserError(f"{out}: already exists; choose another -o folder or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")


@contextmanager
def atomic_folder(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it becomes `out`, on any failure it is removed."""
    out = Path(out)
    check_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():  # --force: the old folder goes only once the new one is complete
            trash = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
