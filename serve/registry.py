"""Several models in one server: each loaded on first use, kept for a while, unloaded when idle.

A `ModelRegistry` knows which names it serves (`catalog`: the model store, or the names given to
`edge-infer serve`) and holds the ones in memory as `Resident`s, each with whatever its loader
built: an engine with its own slots and KV cache for a chat model, an embedder for an embedding
model. The routes never hold a model directly; they take a `Lease`:

    with registry.acquire("smollm2") as lease:   # loads it, or waits (bounded) while it loads
        lease.handle.submit(...)                 # the engine (or embedder) of that model

and a model is unloaded only while nothing holds a lease on it:

  keep-alive  after its last lease ends a model stays `keep_alive_s` (0: unloaded at once,
              negative: never), or what that lease asked for (`Lease.keep_alive`: a request's
              own keep_alive); a sweeper thread unloads the expired ones
  max_loaded  loading one more than this first unloads the least recently used idle model
  max_memory  each model's cost is estimated from its manifest before it loads (its files on
              disk, the weights, plus the KV cache of all its slots); the least recently used
              idle models go until the new one fits

A request that cannot be placed (every loaded model busy, or a model bigger than the budget)
gets a `RegistryError` with an HTTP status and a message naming the model, as does a failed
load (its loader's UserError is a 4xx/5xx, never a traceback) and a request that waited
`load_timeout_s` for another request's load. Loading runs in the caller's thread (the HTTP
layer calls `acquire` in a worker thread), outside the lock: other models keep serving.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from edge_infer.contract.errors import UserError

log = logging.getLogger("edge_infer.serve")

CHAT, EMBED = "chat", "embed"


class RegistryError(Exception):
    """A request for a model that cannot be served now: an HTTP status, a code and a message."""

    def __init__(self, status: int, message: str, code: str, retry: bool = False):
        super().__init__(message)
        self.status, self.message, self.code, self.retry = status, message, code, retry


@dataclass(frozen=True)
class RegistrySettings:
    keep_alive_s: float = 300.0  # after the last request; 0 unloads at once, negative never
    max_loaded: int | None = None  # models in memory at once (None: no limit)
    max_memory: int | None = None  # bytes, against the manifests' estimates (None: no limit)
    load_timeout_s: float = 300.0  # how long a request waits for a model another request is loading

    def validate(self) -> None:
        if self.max_loaded is not None and self.max_loaded < 1:
            raise UserError(f"--max-loaded must be at least 1, got {self.max_loaded}")
        if self.max_memory is not None and self.max_memory < 1:
            raise UserError(f"--max-memory must be positive, got {self.max_memory}")
        if self.load_timeout_s <= 0:
            raise UserError(f"the load timeout must be positive, got {self.load_timeout_s}")


@dataclass(frozen=True)
class Loaded:
    """What a loader built for one model: its kind (CHAT or EMBED), the object requests use (an
    engine, an embedder) and how to let it go."""

    kind: str
    handle: Any
    close: Callable[[], None]


@dataclass
class Resident:
    name: str
    memory: int  # the estimate it was admitted with
    loaded: Loaded | None = None  # None while loading
    error: RegistryError | None = None  # the load failed (waiters read it, then it is dropped)
    leases: int = 0
    last_used: float = 0.0
    expires: float | None = None  # monotonic time it unloads at (None: in use, or never)


class Lease:
    """A hold on a loaded model for the length of one request (a context manager; release once)."""

    def __init__(self, registry: ModelRegistry, resident: Resident):
        self.registry, self.resident = registry, resident
        self.name = resident.name
        assert resident.loaded is not None
        self.kind, self.handle = resident.loaded.kind, resident.loaded.handle
        self.keep_alive_s: float | None = None  # this request's own keep-alive (None: the server's)
        self._released = False

    def keep_alive(self, seconds: float) -> None:
        """Keep the model `seconds` after this request (0: unload after it, negative: never), as a
        request's `keep_alive` asks; the last request to finish sets when an idle model unloads."""
        self.keep_alive_s = seconds

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.registry._release(self.resident, self.keep_alive_s)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class ModelRegistry:
    def __init__(self, catalog: Callable[[], list[str]], canonical: Callable[[str], str],
                 load: Callable[[str], Loaded], estimate: Callable[[str], int],
                 settings: RegistrySettings = RegistrySettings(), clock: Callable[[], float] = time.monotonic):
        """catalog: the names served (called on each lookup, so a model exported meanwhile appears);
        canonical: a request's name as the catalog spells it (UserError: not a valid name);
        load: builds a model (UserError: a bad model folder); estimate: its bytes before loading."""
        settings.validate()
        self.catalog, self.canonical, self.load, self.estimate = catalog, canonical, load, estimate
        self.settings, self.clock = settings, clock
        self._residents: dict[str, Resident] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._sweeper: threading.Thread | None = None
        self.unloads: list[str] = []  # names unloaded, in order (for logs and tests)

    # -- requests ---------------------------------------------------------------------------

    def acquire(self, requested: str) -> Lease:
        """A lease on `requested`, loading it first if needed (blocking: call it from a worker thread)."""
        name = self._served_name(requested)
        deadline = self.clock() + self.settings.load_timeout_s
        with self._cond:
            while True:
                if self._closed:
                    raise RegistryError(503, "the server is shutting down", "server_shutting_down")
                r = self._residents.get(name)
                if r is None:
                    r, victims = self._admit(name)
                    break  # this thread unloads the victims and loads it
                if r.loaded is not None:
                    return self._lease(r)
                left = deadline - self.clock()
                if left <= 0:
                    raise RegistryError(503, f"model '{name}' is still loading; retry shortly", "model_loading",
                                        retry=True)
                self._cond.wait(min(left, 1.0))
                if r.error is not None:  # the load this request waited for failed: the same answer
                    raise r.error
        self._close(victims, "to make room for " + name)
        return self._load(r)

    def _served_name(self, requested: str) -> str:
        try:
            name = self.canonical(requested)
        except UserError:
            name = requested
        if name not in self.catalog():
            raise RegistryError(404, self.not_found(requested), "model_not_found")
        return name

    def not_found(self, requested: str) -> str:
        shown = requested.encode("utf-8", "backslashreplace").decode()
        names = self.catalog()
        listed = ", ".join(f"'{n}'" for n in names[:20]) + (" ..." if len(names) > 20 else "")
        return (f"The model '{shown}' does not exist; this server serves {listed or 'no models'} (GET /v1/models; "
                "`edge-infer list`)")

    def _lease(self, r: Resident) -> Lease:
        r.leases += 1
        r.expires = None
        r.last_used = self.clock()
        return Lease(self, r)

    def _admit(self, name: str) -> tuple[Resident, list[Resident]]:
        """Reserve room for `name` and mark it loading; returns it and the idle models to unload first
        (already out of the books: their memory is counted free)."""
        try:
            need = self.estimate(name)
        except UserError as e:
            raise RegistryError(500, f"model '{name}' cannot be loaded: {e}", "model_load_failed") from None
        budget = self.settings.max_memory
        if budget is not None and need > budget:
            raise RegistryError(507, f"model '{name}' needs about {need / 2**20:.0f} MiB (weights + KV cache of "
                                f"its slots), more than --max-memory {budget / 2**20:.0f} MiB", "model_too_large")
        victims = self._victims(need)
        for v in victims:
            self._residents.pop(v.name)
        r = Resident(name, need, last_used=self.clock())
        self._residents[name] = r
        return r, victims

    def _victims(self, need: int) -> list[Resident]:
        """Idle models to unload, least recently used first, so one more of `need` bytes fits."""
        idle = sorted((r for r in self._residents.values() if r.loaded is not None and r.leases == 0),
                      key=lambda r: r.last_used)
        count = len(self._residents)
        memory = sum(r.memory for r in self._residents.values())
        out: list[Resident] = []
        while self._over(count + 1, memory + need):
            if not idle:
                busy = ", ".join(sorted(self._residents))
                raise RegistryError(503, f"no room to load another model now: {busy} are loaded and in use "
                                    "(--max-loaded / --max-memory); retry shortly", "models_busy", retry=True)
            v = idle.pop(0)
            out.append(v)
            count, memory = count - 1, memory - v.memory
        return out

    def _over(self, count: int, memory: int) -> bool:
        s = self.settings
        return (s.max_loaded is not None and count > s.max_loaded) or (
            s.max_memory is not None and memory > s.max_memory)

    def _load(self, r: Resident) -> Lease:
        started = time.monotonic()
        try:
            loaded = self.load(r.name)
        except BaseException as e:
            error = _load_error(r.name, e)
            with self._cond:
                r.error = error
                self._residents.pop(r.name, None)
                self._cond.notify_all()
            if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit: not ours to answer
                raise
            raise error from None
        with self._cond:
            r.loaded = loaded
            lease = self._lease(r)
            self._cond.notify_all()
        log.info("loaded %s (%s) in %.1f s", r.name, loaded.kind, time.monotonic() - started)
        return lease

    def _release(self, r: Resident, keep_alive_s: float | None = None) -> None:
        """A request is done with `r`: the last one starts its keep-alive (the sweeper unloads it),
        the request's own (`keep_alive_s`) or else the server's."""
        keep = self.settings.keep_alive_s if keep_alive_s is None else keep_alive_s
        with self._cond:
            r.leases -= 1
            r.last_used = self.clock()
            if r.leases == 0 and keep >= 0:
                r.expires = r.last_used + keep
                self._cond.notify_all()

    # -- unloading --------------------------------------------------------------------------

    def sweep(self) -> list[str]:
        """Unload every idle model whose keep-alive has passed; returns their names."""
        now = self.clock()
        with self._cond:
            expired = [r for r in self._residents.values()
                       if r.loaded is not None and r.leases == 0 and r.expires is not None and r.expires <= now]
            for r in expired:
                self._residents.pop(r.name)
        self._close(expired, "keep-alive passed")
        return [r.name for r in expired]

    def _close(self, victims: list[Resident], why: str) -> None:
        for r in victims:
            assert r.loaded is not None
            try:
                r.loaded.close()
            except Exception as e:  # an engine that fails to stop must not take the registry down
                log.error("unloading %s: %s: %s", r.name, type(e).__name__, e)
            log.info("unloaded %s (%s)", r.name, why)
            with self._cond:
                self.unloads.append(r.name)

    def start(self) -> None:
        """Run the sweeper thread (unloads models as their keep-alive passes)."""
        self._sweeper = threading.Thread(target=self._sweep_loop, name="edge-infer-keep-alive", daemon=True)
        self._sweeper.start()

    def _sweep_loop(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                times = [r.expires for r in self._residents.values() if r.expires is not None]
                wait = max(0.0, min(times) - self.clock()) if times else None
                self._cond.wait(None if wait is None else min(wait + 0.01, 60.0))
                if self._closed:
                    return
            self.sweep()

    def close(self) -> None:
        """Stop the sweeper and unload every model (the server is shutting down)."""
        with self._cond:
            self._closed = True
            everything = [r for r in self._residents.values() if r.loaded is not None]
            self._residents.clear()
            self._cond.notify_all()
        self._close(everything, "shutdown")
        if self._sweeper is not None:
            self._sweeper.join(5.0)

    # -- what the server shows ------------------------------------------------------------------

    def status(self, name: str) -> str:
        """"loaded", "loading" or "unloaded"."""
        with self._cond:
            r = self._residents.get(name)
            return "unloaded" if r is None else ("loaded" if r.loaded is not None else "loading")

    def snapshot(self) -> dict[str, dict]:
        """Each loaded or loading model: status, leases, seconds to its unload, estimated bytes, kind."""
        now = self.clock()
        with self._cond:
            return {r.name: {"status": "loaded" if r.loaded is not None else "loading", "requests": r.leases,
                             "unloads_in_s": None if r.expires is None else round(max(0.0, r.expires - now), 3),
                             "memory_bytes": r.memory, "kind": r.loaded.kind if r.loaded else None}
                    for r in self._residents.values()}

    def handles(self) -> dict[str, Loaded]:
        """The loaded models' handles by name (for /health and /metrics)."""
        with self._cond:
            return {r.name: r.loaded for r in self._residents.values() if r.loaded is not None}


def _load_error(name: str, e: BaseException) -> RegistryError:
    """A failed load as an answer naming the model: a bad model folder says what is wrong with it."""
    if isinstance(e, RegistryError):
        return e
    if isinstance(e, UserError):
        return RegistryError(500, f"model '{name}' failed to load: {e}", "model_load_failed")
    log.error("loading %s failed: %s: %s", name, type(e).__name__, e)
    return RegistryError(500, f"model '{name}' failed to load ({type(e).__name__}; see the server log)",
                         "model_load_failed")
