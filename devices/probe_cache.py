"""The batch invariance probe's verdicts, kept per machine so a shape class is probed once.

A verdict depends on the configuration and on everything that picks the kernel's code path: the
onnxruntime version, the providers (with their options), the thread count and the CPU (its name
and a hash of its feature flags). One JSON file per such machine key, under `cache_root()`
($EDGE_INFER_CACHE_DIR, else $XDG_CACHE_HOME/edge-infer, else the user cache folder). Reading or
writing it never fails a load: a missing, broken or unwritable cache only means probing again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edge_infer.devices.invariance import FROM_TWO, NOT_INVARIANT, ROW_INVARIANT, UNKNOWN, KernelConfig, ProbeResult
from edge_infer.devices.probe_graphs import probe

log = logging.getLogger("edge_infer")
PROBE_VERSION = 1  # bump when the probe's method changes: older entries are then ignored


def cache_root() -> Path:
    """Where edge-infer keeps what it measured about this machine: $EDGE_INFER_CACHE_DIR, else
    $XDG_CACHE_HOME/edge-infer, else the platform's user cache folder."""
    if os.environ.get("EDGE_INFER_CACHE_DIR"):
        return Path(os.environ["EDGE_INFER_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "edge-infer"
    try:
        home = Path.home()
    except RuntimeError:  # no home folder to be found: a cache for this boot only
        return Path(tempfile.gettempdir()) / "edge-infer-cache"
    if sys.platform == "darwin":
        return home / "Library" / "Caches" / "edge-infer"
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "edge-infer" / "cache"
    return home / ".cache" / "edge-infer"


def cpu_identity() -> dict[str, str]:
    """The CPU's name and a hash of its feature flags (what kernel dispatch reads); portable fallbacks
    where /proc/cpuinfo does not exist."""
    name, flags = "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if not name and key in ("model name", "hardware", "cpu model", "processor") and not value.strip().isdigit():
                name = value.strip()
            if not flags and key in ("flags", "features"):
                flags = " ".join(sorted(value.split()))
            if name and flags:
                break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or "unknown"
    if not flags:  # no /proc/cpuinfo: the processor string and the platform stand in for the flags
        flags = f"{platform.system()} {platform.machine()} {platform.processor()}"
    return {"cpu": name, "machine": platform.machine(), "flags_sha256": hashlib.sha256(flags.encode()).hexdigest()[:16]}


def machine_key(providers: Sequence, threads: int) -> dict[str, Any]:
    """Everything a verdict depends on besides the configuration."""
    from edge_infer.devices.ort import ort

    names = [p if isinstance(p, str) else [p[0], sorted(dict(p[1]).items())] for p in providers]
    return {"probe": PROBE_VERSION, "onnxruntime": ort.__version__, "providers": names, "threads": threads,
            **cpu_identity()}


class ProbeCache:
    """Verdicts of one machine key, in `<root>/batch-invariance/<hash of the key>.json`."""

    def __init__(self, key: dict[str, Any], root: Path | None = None):
        self.key = key
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.path = (cache_root() if root is None else root) / "batch-invariance" / f"{digest}.json"
        self.entries: dict[str, dict[str, str]] = {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("machine") == json.loads(json.dumps(key)):
                self.entries = {k: v for k, v in data.get("results", {}).items() if isinstance(v, dict)}
        except (OSError, ValueError, AttributeError):
            pass

    def get(self, config: KernelConfig) -> ProbeResult | None:
        e = self.entries.get(config.key())
        if e is None or e.get("verdict") not in (ROW_INVARIANT, FROM_TWO, NOT_INVARIANT):
            return None
        return ProbeResult(config, e["verdict"], str(e.get("detail", "")), cached=True)

    def put(self, results: Sequence[ProbeResult]) -> None:
        fresh = {r.config.key(): {"verdict": r.verdict, "detail": r.detail, "describe": r.config.describe()}
                 for r in results if not r.cached and r.verdict != UNKNOWN}  # an unknown is retried next time
        if not fresh:
            return
        self.entries.update(fresh)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")  # one per writer
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"machine": self.key, "results": self.entries}, indent=1), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as e:
            log.debug("batch invariance: could not write the probe cache %s (%s)", self.path, e)
            try:
                tmp.unlink()
            except OSError:
                pass


def probe_graph(configs: Sequence[KernelConfig], make_options: Callable[[], Any], providers: Sequence,
                threads: int, root: Path | None = None) -> list[ProbeResult]:
    """A verdict for each configuration: from the cache, else probed now (and cached)."""
    cache = ProbeCache(machine_key(providers, threads), root)
    results = [cache.get(c) or probe(c, make_options, providers) for c in configs]
    cache.put(results)
    return results


def cached_results(providers: Sequence, threads: int,
                   root: Path | None = None) -> tuple[Path, list[tuple[str, ProbeResult]]]:
    """(cache file, [(configuration as first described, its verdict)]) for this machine key: what
    `edge-infer devices` shows."""
    cache = ProbeCache(machine_key(providers, threads), root)
    found = []
    for key, entry in cache.entries.items():
        try:
            op, params = json.loads(key)
            config = KernelConfig(op, tuple((k, _frozen(v)) for k, v in params))
        except (ValueError, TypeError):
            continue
        result = cache.get(config)
        if result is not None:
            found.append((str(entry.get("describe") or config.describe()), result))
    return cache.path, found


def _frozen(value: Any) -> Any:
    """A JSON value back as KernelConfig holds it (lists as tuples)."""
    return tuple(_frozen(v) for v in value) if isinstance(value, list) else value
