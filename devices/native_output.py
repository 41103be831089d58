"""What native libraries print, kept off stdout and read back when a provider fails to start.

Provider libraries write to the process's file descriptors, below Python's sys.stdout: QNN's
plugin prints `# LIBNATIVE: No alternate configuration ...` on fd 1 while a session is created,
in front of the model's answer. `stdout_to_stderr()` points fd 1 at fd 2 for such a block, so
stdout carries only the model's text. `captured_stderr()` collects fd 2 for a block (onnxruntime's
log, where a provider that fails to start says why: `[OpenVINO] Device NPU is not available`).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Writes to fd 1 (native libraries' included) go to fd 2 for the block."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no fd 1 (a daemon): nothing to protect
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@dataclass
class Captured:
    text: str = ""
    lines: list[str] = field(default_factory=list)


@contextmanager
def captured_stderr() -> Iterator[Captured]:
    """fd 2 into a temporary file for the block; its text is in the yielded object afterwards."""
    out = Captured()
    sys.stderr.flush()
    with tempfile.TemporaryFile() as f:
        saved = os.dup(2)
        try:
            os.dup2(f.fileno(), 2)
            yield out
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            out.text = f.read().decode("utf-8", "replace")
            out.lines = [line for line in (log_message(raw) for raw in out.text.splitlines()) if line]


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_PREFIX = re.compile(r"^\S+ \S+ \[[EWIV]:onnxruntime:[^\]]*\] (?:\S+:\d+ \S+\] )?")
_SOURCE = re.compile(r"^\S+\.(?:cc|cpp|h):\d+ .*?\[(?:ERROR|WARNING)\] ")  # "file.cc:141 signature [ERROR] "


def log_message(line: str) -> str:
    """An onnxruntime log line without colour codes, timestamp, source file and function."""
    return _SOURCE.sub("", _PREFIX.sub("", _ANSI.sub("", line)).strip()).strip()
