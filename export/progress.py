"""Progress for long exports: named stages on stderr and a bar for the long steps."""

from __future__ import annotations

import sys
import time


class Bar:
    def __init__(self, progress: "Progress", label: str, total: int | None):
        self.progress, self.label, self.total, self.done = progress, label, total, 0
        self._last = 0.0

    def update(self, done: int, total: int | None = None) -> None:
        self.done, self.total = done, total or self.total
        now = time.monotonic()
        if self.progress.quiet or (now - self._last < 0.1 and done != self.total):
            return
        if not self.progress.interactive and done != self.total:
            return  # a log file gets the finished bar only
        self._last = now
        if self.total:
            width = 30
            filled = int(width * done / max(self.total, 1))
            self.progress.write(f"\r  {self.label} [{'#' * filled}{' ' * (width - filled)}] {done}/{self.total}",
                                newline=False)

    def close(self) -> None:
        if not self.progress.quiet and self.total:
            self.progress.write("", newline=True)


class Progress:
    def __init__(self, quiet: bool = False, stream=None):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.monotonic()

    def write(self, text: str, newline: bool = True) -> None:
        if not self.quiet:
            self.stream.write(text + ("\n" if newline else ""))
            self.stream.flush()

    def stage(self, name: str) -> None:
        self.write(f"[{time.monotonic() - self.start:6.1f}s] {name}")

    def note(self, text: str) -> None:
        self.write(f"          {text}")

    def bar(self, label: str, total: int | None) -> Bar:
        return Bar(self, label, total)

    def done(self, text: str) -> None:
        self.write(f"[{time.monotonic() - self.start:6.1f}s] {text}")
