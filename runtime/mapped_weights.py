"""Hand back the pages of a model's weights file that onnxruntime keeps mapped but no longer reads.

onnxruntime maps a graph's external data file privately (mmap, MAP_PRIVATE, one mapping per initializer)
and reads every initializer while it opens the session. MatMulNBits packs its weights, scales and zero
points into buffers of its own then, and its kernels read only those. The mappings of the 4-bit and 8-bit
blocks go once packed, but those of the scales and zero points stay, every page the packing read still
resident: 207 MiB of the 1.5B geometry's 1608 after load, 50 of the 0.5B's 664 (Intel Xeon, onnxruntime
1.32; benchmarks/RESULTS.md), and no later pass reads them. What a pass does read from the file is the
8-bit vocabulary table's rows that the embedding lookup and the lm_head rescoring gather.

`release(files)` drops the resident pages of every private mapping of those files in which no page was
ever written (/proc/self/smaps: "Anonymous: 0 kB"). Such a page is the file's own, so a later read, if
one comes, faults it back in from the page cache with the same bytes: the logits do not change (tests).
A mapping with a written page is left as it is. Linux only; elsewhere, or when /proc cannot be read,
nothing happens: this saves memory and never decides an answer.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from pathlib import Path
from typing import Iterable

log = logging.getLogger("edge_infer")

SMAPS = "/proc/self/smaps"
MADV_DONTNEED = 4  # linux/mman.h


def release(files: Iterable[str | os.PathLike]) -> int:
    """Drop the resident pages of `files`' private, never-written mappings in this process; returns the
    bytes that were resident in them (0 off Linux, or when nothing maps the files)."""
    if not sys.platform.startswith("linux"):
        return 0
    wanted = {os.path.realpath(f) for f in files}
    try:
        mappings = [m for m in private_mappings(Path(SMAPS).read_text()) if m.path in wanted]
    except OSError:
        return 0
    if not mappings:
        return 0
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    released = 0
    for m in mappings:
        if m.anonymous_kb or not m.rss_kb:  # a written page is the process's own; an empty mapping has nothing
            continue
        if madvise(m.start, m.end - m.start, MADV_DONTNEED) == 0:
            released += m.rss_kb * 1024
    log.debug("released %.1f MiB of mapped weight pages", released / 2**20)
    return released


def trim_heap() -> bool:
    """Return the C heap's free pages to the system (glibc's malloc_trim); False where there is none.

    A session closed inside a running process frees its packed weights into the heap, where glibc keeps
    them resident; the next session's packing does not reuse most of them (measured: +230 MiB at 0.5B
    for a session reopened in a serving process, Model.respin), so they are handed back first.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except AttributeError:  # a C library without malloc_trim (musl)
        return False


class Mapping:
    """One private file mapping of /proc/self/smaps: its address range, file, and page counts."""

    def __init__(self, start: int, end: int, path: str):
        self.start, self.end, self.path = start, end, path
        self.rss_kb = 0
        self.anonymous_kb = 0  # pages written since mapping (copies of the process's own)


def private_mappings(smaps: str) -> list[Mapping]:
    """The private file mappings listed in `smaps` (the text of /proc/<pid>/smaps), with Rss and Anonymous."""
    out: list[Mapping] = []
    current: Mapping | None = None
    for line in smaps.splitlines():
        head, _, rest = line.partition(" ")
        if head.endswith(":"):  # a field line of the current mapping: "Rss:   1234 kB"
            if current is not None and head in ("Rss:", "Anonymous:"):
                kb = int(rest.split()[0])
                if head == "Rss:":
                    current.rss_kb = kb
                else:
                    current.anonymous_kb = kb
            continue
        # a mapping line: "7f01c000-7f01e000 rw-p 0053a000 fe:00 2819494    /models/x/model.onnx.data"
        parts = line.split(maxsplit=5)
        current = None
        if len(parts) == 6 and "-" in parts[0] and parts[1].endswith("p") and parts[5].startswith("/"):
            lo, hi = parts[0].split("-")
            current = Mapping(int(lo, 16), int(hi, 16), parts[5])
            out.append(current)
    return out
