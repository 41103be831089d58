"""Whether onnxruntime's CPU threads should spin, from what other processes do on our cores.

onnxruntime's intra-op threads spin between the parallel sections of a run instead of sleeping:
a decode step is hundreds of kernels, and waking a sleeping thread for each costs more than the
spin. That holds while the cores are ours. When another process keeps one of them busy, a
spinning thread burns the time slices the thread doing the work needs, and every section waits
for the slowest one. Measured on the Intel Xeon (2 vCPU, 2 threads, one `while True` process
beside the engine, benchmarks/RESULTS.md "Decoding beside a busy core"): SmolLM2-135M decodes
38 / 24 tok/s spinning against 57 / 37 without (prompts 128 / 1024), Qwen2.5-Coder-0.5B 13 / 12
against 21 / 19; on the quiet machine spinning wins, 84 / 53 against 59 / 41 and 32 / 27 against
26 / 23. onnxruntime-genai, which spins, loses as much as we did under the same load.

A session's spinning is fixed when it opens, so `load` measures the cores while the model loads
(reading the manifest, hashing its files, the tokenizer): `sample()` before, `decide()` just
before the session opens. Other processes' use of the CPUs this process may run on is their busy
time in /proc/stat minus this process's own CPU time over that window. Where more than
SPARE_CORES of the CPUs our threads need are taken, the threads do not spin. What runs later is not
seen by `load`; a server re-decides while it is idle (`Watch`, serve/engine.py) and reopens its
session when the machine has changed. `EDGE_INFER_SPIN=on|off` (or `load(allow_spinning=...)`)
fixes the choice. Linux only;
elsewhere, or when /proc cannot be read, the threads spin, as before. A model on the process-wide
thread pool (a target and its draft model) keeps the pool's spinning: onnxruntime fixes it when the
pool is made.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from edge_infer.contract.errors import UserError
from edge_infer.devices.providers import allowed_cpus

ENV = "EDGE_INFER_SPIN"  # auto | on | off, for tools that cannot pass load(allow_spinning=...)
CHOICES = ("auto", "on", "off")
MIN_WINDOW_S = 0.05  # /proc/stat counts in 10 ms ticks: 5 ticks per CPU at least
# Other processes may take this much of the CPUs our threads need before they stop spinning: beside half a
# core of load (10 ms busy, 10 ms idle) spinning still decoded the 135M model 1.13x faster, beside a whole
# core 0.66x (benchmarks/RESULTS.md); the threshold sits between the two.
SPARE_CORES = 0.75
PROC_STAT = Path("/proc/stat")


@dataclass(frozen=True)
class CpuSample:
    """Busy time of the CPUs this process may run on, and this process's own CPU time, at one moment."""

    wall: float  # time.monotonic(), seconds
    busy: float  # seconds the allowed CPUs spent not idle (user, nice, system, irq, softirq, steal)
    own: float  # this process's user + system seconds, every thread
    cpus: int  # how many CPUs were summed


@dataclass(frozen=True)
class Spinning:
    """Whether the model's threads spin, and why."""

    on: bool
    reason: str
    forced: bool = False  # asked for (allow_spinning= or EDGE_INFER_SPIN) rather than measured
    others: float | None = None  # cores other processes used while the model loaded

    def describe(self) -> str:
        return f"{'on' if self.on else 'off'}{' (forced)' if self.forced else ''}: {self.reason}"


def busy_seconds(stat_text: str, cpus: list[int], ticks_per_second: float) -> float | None:
    """Seconds the CPUs `cpus` spent busy, from /proc/stat's per-CPU lines; None when one is missing."""
    busy = 0
    seen = set()
    for line in stat_text.splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu":
            continue
        cpu = int(name[3:])
        if cpu not in cpus:
            continue
        fields = [int(v) for v in rest.split()]
        user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
        steal = fields[7] if len(fields) > 7 else 0  # a hypervisor giving our vCPU to someone else is contention too
        busy += user + nice + system + irq + softirq + steal
        seen.add(cpu)
    return busy / ticks_per_second if seen == set(cpus) else None


def sample() -> CpuSample | None:
    """The allowed CPUs' busy time and our own CPU time now; None where /proc/stat cannot be read."""
    cpus = allowed_cpus() or list(range(os.cpu_count() or 1))
    try:
        busy = busy_seconds(PROC_STAT.read_text(), cpus, float(os.sysconf("SC_CLK_TCK")))
    except (OSError, ValueError, IndexError):
        return None
    if busy is None:
        return None
    t = os.times()
    return CpuSample(time.monotonic(), busy, t.user + t.system, len(cpus))


def others_cores(start: CpuSample, end: CpuSample) -> float:
    """Cores other processes kept busy on our CPUs between two samples (our own CPU time taken out)."""
    wall = end.wall - start.wall
    return max(0.0, ((end.busy - start.busy) - (end.own - start.own)) / wall) if wall > 0 else 0.0


def requested(allow_spinning: bool | None) -> tuple[str, str]:
    """("on" | "off" | "auto", who asked): allow_spinning when given, else $EDGE_INFER_SPIN, else auto."""
    if allow_spinning is not None:
        return ("on" if allow_spinning else "off"), f"allow_spinning={allow_spinning}"
    value = os.environ.get(ENV) or "auto"
    if value not in CHOICES:
        raise UserError(f"{ENV}={value!r} is not a spinning choice: use {', '.join(CHOICES)}")
    return value, f"{ENV}={value}"


def choose(asked: str, threads: int, others: float | None, cpus: int, source: str = "",
           when: str = "while the model loaded") -> Spinning:
    """The spinning for `threads` threads on `cpus` CPUs of which other processes used `others` cores
    (`when`: over which window); asked "on" / "off" (by `source`) is taken as it is."""
    if asked != "auto":
        return Spinning(asked == "on", f"asked for by {source}" if source else "asked for", forced=True)
    if others is None:
        return Spinning(True, "other processes' CPU use could not be read here (no /proc/stat)")
    used = f"other processes used {others:.1f} of {cpus} CPUs {when}"
    if others > cpus - min(threads, cpus) + SPARE_CORES:
        return Spinning(False, f"{used}; threads spinning beside them lose 30-40% (EDGE_INFER_SPIN=on to spin)",
                        others=others)
    return Spinning(True, f"{used} (EDGE_INFER_SPIN=off not to spin)", others=others)


def decide(allow_spinning: bool | None, threads: int, start: CpuSample | None) -> Spinning:
    """The spinning for a model whose load began at `start` (sample() then), measured up to now."""
    asked, source = requested(allow_spinning)
    if asked != "auto":
        return choose(asked, threads, None, 0, source)
    start = start or sample()  # a Model opened without load(): measure from now
    if start is None:
        return choose(asked, threads, None, 0)
    remaining = MIN_WINDOW_S - (time.monotonic() - start.wall)
    if remaining > 0:  # a window this short would read a busy core as 0 or 2 ticks
        time.sleep(remaining)
    end = sample()
    if end is None:
        return choose(asked, threads, None, 0)
    return choose(asked, threads, others_cores(start, end), end.cpus)


WATCH_WINDOW_S = 2.0  # a server's idle windows: long enough to read a busy core to within 0.05
WATCH_CONFIRM = 3  # consecutive windows that must disagree with the session's spinning before it changes


class Watch:
    """Re-decides a long-running model's spinning from windows in which it ran nothing.

    While the model runs, its own spinning threads take CPU time from the other processes, which then
    read lower than they would alone (a busy core read 1.01 beside the idle 135M model, 0.65 while it decoded), so
    only windows the model spent idle count: `idle()` opens one (or keeps the open one), `busy()`
    drops it. A change is proposed when WATCH_CONFIRM consecutive windows of WATCH_WINDOW_S disagree
    with the current choice; the caller reopens the session then (Model.respin) and calls `now_on`.
    """

    def __init__(self, threads: int, on: bool, window_s: float = WATCH_WINDOW_S, confirm: int = WATCH_CONFIRM,
                 sampler=None):
        self.threads, self.on, self.window_s, self.confirm = threads, on, window_s, confirm
        self._sample = sampler or sample
        self._start: CpuSample | None = None
        self._against = 0  # consecutive windows that disagreed

    def busy(self) -> None:
        self._start = None

    def idle(self) -> float | None:
        """Open a window if none is open; seconds until the open one ends (None: /proc/stat unreadable)."""
        if self._start is None:
            self._start = self._sample()
            if self._start is None:
                return None
        return max(0.0, self.window_s - (time.monotonic() - self._start.wall))

    def poll(self) -> Spinning | None:
        """At the end of an idle window: the new choice once enough windows disagreed, else None."""
        if self._start is None or time.monotonic() - self._start.wall < self.window_s:
            return None
        end = self._sample()
        if end is None:
            self._start = None
            return None
        idle = f"over the last {end.wall - self._start.wall:.0f} s idle"
        choice = choose("auto", self.threads, others_cores(self._start, end), end.cpus,
                        when=idle + (f" (the last of {self.confirm} windows that agreed)" if self.confirm > 1 else ""))
        self._start = end
        self._against = self._against + 1 if choice.on != self.on else 0
        if self._against < self.confirm:
            return None
        self._against = 0
        return choice

    def now_on(self, on: bool) -> None:
        self.on, self._against = on, 0
