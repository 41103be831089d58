"""Issue 10, killed exports: stale `.NAME.partial-*` folders are cleaned by the next export into the same
parent, and `--force` never leaves neither the old folder nor the new one, even when killed mid-swap."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edge_infer.export import atomic
from edge_infer.export.atomic import atomic_folder, recover

CHILD = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from edge_infer.export import atomic
    out, kill_at, exchange = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
    if not exchange:
        atomic._exchange = lambda a, b: False  # the two-rename path of systems without RENAME_EXCHANGE
    atomic.after_step = lambda step: os._exit(9) if step == kill_at else None
    with atomic.atomic_folder(out, force=True) as tmp:
        (tmp / "manifest.json").write_text("new")
        if kill_at == "writing":
            os._exit(9)
""")


def killed_export(out: Path, kill_at: str, exchange: bool = True) -> int:
    r = subprocess.run([sys.executable, "-c", CHILD, str(out), kill_at, "1" if exchange else "0"], timeout=60)
    return r.returncode


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("kill_at, exchange, after", [
    ("writing", True, "old"), ("written", True, "old"), ("exchanged", True, "new"),
    ("writing", False, "old"), ("written", False, "old"), ("moved-old", False, None),
])
def test_a_kill_at_any_step_leaves_the_old_or_the_new_folder(tmp_path, kill_at, exchange, after):
    out = tmp_path / "model"
    out.mkdir()
    (out / "manifest.json").write_text("old")
    assert killed_export(out, kill_at, exchange) == 9
    if after is not None:
        assert (out / "manifest.json").read_text() == after
    else:  # killed between the two renames: only the recovery can bring the old folder back
        assert not out.exists() and any(".old-" in n for n in leftovers(tmp_path))
    assert leftovers(tmp_path), "the kill left its temporary folder (the next export cleans it)"
    done = recover(out)
    assert done and (out / "manifest.json").read_text() in ("old", "new")
    assert leftovers(tmp_path) == []
    with atomic_folder(out, force=True) as tmp:  # and the next export goes through
        (tmp / "manifest.json").write_text("newest")
    assert (out / "manifest.json").read_text() == "newest" and leftovers(tmp_path) == []


def test_next_export_cleans_only_stale_partials(tmp_path):
    out = tmp_path / "model"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".model.partial-{dead_pid}-1-abcd"
    live = tmp_path / f".model.partial-{os.getpid()}-{atomic._start_time(os.getpid())}-efgh"
    reused = tmp_path / f".model.partial-{os.getpid()}-12345-ijkl"  # our pid, another process's start time
    legacy = tmp_path / ".model.partial-x1y2z3"  # no owner in the name: never touched
    other = tmp_path / f".other.partial-{dead_pid}-1-abcd"  # another target's: not ours to clean
    for p in (stale, live, reused, legacy, other):
        p.mkdir()
        (p / "weights").write_bytes(b"x" * 100)
    with atomic_folder(out) as tmp:
        assert tmp.name.startswith(f".model.partial-{os.getpid()}-")
        (tmp / "manifest.json").write_text("new")
    assert not stale.exists() and not reused.exists()
    assert live.exists() and legacy.exists() and other.exists() and out.is_dir()


def test_exchange_is_atomic_on_linux(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "f").write_text("a")
    (b / "f").write_text("b")
    if not sys.platform.startswith("linux"):
        assert atomic._exchange(a, b) is False
        return
    assert atomic._exchange(a, b) is True
    assert (a / "f").read_text() == "b" and (b / "f").read_text() == "a"


def test_a_failed_export_removes_its_partial(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with atomic_folder(out):
            raise RuntimeError("boom")
    assert not out.exists() and leftovers(tmp_path) == []
