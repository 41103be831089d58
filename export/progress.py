"""Progress for long exports (and loads): a line per stage, a bar with rate and ETA for each stage
that counts its work (tqdm), and a callback for applications.

    Progress(quiet=False, stream=sys.stderr, callback=None)

Stage lines go to `stream` unless `quiet`; the bars only when `stream` is a terminal (a log file
gets the stage lines and notes) and tqdm is installed (the gguf and export extras bring it). `callback(stage, done, total)` sees every stage, terminal or not,
quiet or not: `(stage, 0, total)` when it starts, counts as its work goes on, and
`(stage, total, total)` when it ends. `stage` is a short key: the stage line's first word
("reading", "building", "quantizing", "writing", "validating", ...) unless the stage names one.
A stage that counts nothing reports `total` 1.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Mapping
from typing import Callable

ProgressCallback = Callable[[str, int, int], None]


class Bar:
    """The counter of one stage: `update(done, total)` with absolute counts, or `advance(n)`."""

    def __init__(self, progress: "Progress", key: str, label: str, total: int | None, unit: str = "it"):
        self.progress, self.key, self.label, self.total, self.unit = progress, key, label, total, unit
        self.done = 0
        self.closed = False
        self._tqdm = None
        self.progress.report(key, 0, total or 1)

    def _bar(self):
        if self._tqdm is None and self.progress.shows_bars and self.total:
            try:
                from tqdm import tqdm  # with the gguf and export extras (every export installs one)
            except ImportError:  # `quantize` on a base install: the stage lines only
                self.progress.interactive = False
                return None
            self._tqdm = tqdm(total=self.total, desc=f"  {self.label}", unit=self.unit, unit_scale=self.unit == "B",
                              file=self.progress.stream, leave=True, dynamic_ncols=True, mininterval=0.2)
        return self._tqdm

    def update(self, done: int, total: int | None = None) -> None:
        if total and total != self.total:
            self.total = total
            if self._tqdm is not None:
                self._tqdm.total = total
        bar = self._bar()
        if bar is not None:
            bar.update(done - self.done)
        self.done = done
        self.progress.report(self.key, done, self.total or 1)

    def advance(self, n: int = 1) -> None:
        self.update(self.done + n)

    def close(self) -> None:
        """The stage is over: its count reaches its total."""
        if self.closed:
            return
        self.closed = True
        if self.total is None:  # counted nothing: no bar, the callback sees it end
            self.progress.report(self.key, 1, 1)
            return
        if self.done < self.total:
            self.update(self.total)
        if self._tqdm is not None:
            self._tqdm.close()


class Progress:
    def __init__(self, quiet: bool = False, stream=None, callback: ProgressCallback | None = None):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.callback = callback
        self.start = time.monotonic()
        self.current: Bar | None = None

    @property
    def shows_bars(self) -> bool:
        return self.interactive and not self.quiet

    def write(self, text: str, newline: bool = True) -> None:
        if self.quiet:
            return
        bar = self.current._tqdm if self.current is not None else None
        if bar is not None and not self.current.closed:  # above the running bar, which is drawn again below
            bar.write(text, file=self.stream, end="\n" if newline else "")
            return
        self.stream.write(text + ("\n" if newline else ""))
        self.stream.flush()

    def report(self, key: str, done: int, total: int) -> None:
        if self.callback is not None:
            self.callback(key, done, total)

    def stage(self, name: str, total: int | None = None, unit: str = "it", key: str | None = None) -> Bar:
        """End the stage running, start `name`; returns its counter (`total` may come later)."""
        self.end_stage()
        self.write(f"[{time.monotonic() - self.start:6.1f}s] {name}")
        self.current = Bar(self, key or name.split()[0], name.split(" (")[0], total, unit)
        return self.current

    def end_stage(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None

    def note(self, text: str) -> None:
        self.write(f"          {text}")

    def bar(self, label: str, total: int | None) -> Bar:
        """The running stage's counter (a stage of its own when none runs)."""
        if self.current is None or self.current.closed:
            return self.stage(label, total)
        if total:
            self.current.total = total
        return self.current

    def done(self, text: str) -> None:
        self.end_stage()
        self.write(f"[{time.monotonic() - self.start:6.1f}s] {text}")


class CountedWeights(Mapping):
    """`weights` as the graph builder sees them, counting on `bar` each weight it takes once."""

    def __init__(self, weights: Mapping, bar: Bar):
        self.weights, self.bar = weights, bar
        self.taken: set[str] = set()

    def __getitem__(self, name):
        value = self.weights[name]
        if name not in self.taken:
            self.taken.add(name)
            self.bar.update(len(self.taken), len(self.weights))
        return value

    def __iter__(self) -> Iterator:
        return iter(self.weights)

    def __len__(self) -> int:
        return len(self.weights)
