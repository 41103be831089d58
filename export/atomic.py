"""Write a model folder atomically: a hidden temporary sibling, swapped into place at the end.

Whatever fails or is killed before the swap leaves no folder at the target
path; a folder that exists there is either the old one or the finished new one.

Names carry their owner: `.NAME.partial-PID-START-xxxx` (the folder being
written) and `.NAME.old-PID-START` (the old folder, only on systems without an
atomic exchange), where START is the process's start time, so a reused pid is
not mistaken for the owner. Every export into a parent first recovers what a
killed export there left: a stale partial folder is removed, and an old folder
whose owner died between the two renames of a `--force` is put back if nothing
took its place (else removed).

`--force` on Linux swaps the two folders with one renameat2(RENAME_EXCHANGE)
call, so no instant exists with neither; elsewhere it is two renames, and a kill
between them is repaired by the next export into the same parent.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from edge_infer.contract.errors import UserError

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2

# Test hook: called with the name of each step of the swap ("written", "exchanged", "moved-old"),
# so a test can kill the process between steps.
after_step: Callable[[str], None] = lambda step: None  # noqa: E731


def check_target(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise UserError(f"{out}: already exists; choose another -o folder or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")


def _start_time(pid: int) -> str:
    """A token that differs between two processes that had the same pid ("0" where unknown)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:].split()[19]  # field 22: start time in clock ticks after boot
    except (OSError, ValueError, IndexError):
        return "0"


def _owner_tag() -> str:
    return f"{os.getpid()}-{_start_time(os.getpid())}"


def _owner_alive(tag: str) -> bool:
    """Whether the process named by a `PID-START` tag still runs (unknown forms count as alive: kept)."""
    parts = tag.split("-")
    if len(parts) < 2 or not parts[0].isdigit() or not parts[1].isdigit():
        return True
    pid = int(parts[0])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    start = _start_time(pid)
    return start == "0" or parts[1] == "0" or start == parts[1]


def recover(out: Path) -> list[str]:
    """Repair what killed exports into `out`'s parent left for `out`; returns what was done (for tests/logs)."""
    done: list[str] = []
    parent = out.parent
    if not parent.is_dir():
        return done
    for old in sorted(parent.glob(f".{glob.escape(out.name)}.old-*")):
        if _owner_alive(old.name[len(f".{out.name}.old-"):]):
            continue
        if not out.exists():  # killed between the two renames of --force: the old folder comes back
            old.rename(out)
            done.append(f"restored {out} from {old.name}")
        else:
            shutil.rmtree(old, ignore_errors=True)
            done.append(f"removed {old.name}")
    for partial in sorted(parent.glob(f".{glob.escape(out.name)}.partial-*")):
        if not _owner_alive(partial.name[len(f".{out.name}.partial-"):]):
            shutil.rmtree(partial, ignore_errors=True)
            done.append(f"removed {partial.name}")
    return done


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the OS cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl without it
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a filesystem without exchange
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


@contextmanager
def atomic_folder(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it becomes `out`, on any failure it is removed."""
    out = Path(out)
    recover(out)
    check_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = _owner_tag()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{tag}-", dir=out.parent))
    try:
        yield tmp
        after_step("written")
        if out.exists():  # --force: the old folder goes only once the new one is complete
            if _exchange(tmp, out):  # tmp now holds the old folder; `out` is never missing
                after_step("exchanged")
                shutil.rmtree(tmp, ignore_errors=True)
                return
            trash = out.with_name(f".{out.name}.old-{tag}")
            out.rename(trash)
            after_step("moved-old")  # a kill here leaves only the trash: recover() puts it back
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
