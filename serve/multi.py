"""A server of several models: `edge-infer serve` with no model (the whole store) or several names.

`StoreModels` is the app's ModelResolver (serve/http_layer.py) over a ModelRegistry
(serve/registry.py): a request's "model" is a store name (`NAME` or `NAME:TAG`); it loads on first
use as its own engine (its own slots, KV cache and metrics), and the request holds it until its
response is sent. /v1/models lists the store (each entry with its `status`: loaded, loading or
unloaded), /health and /metrics report each loaded model under its name.

A model given by path (`folders`: an embedding folder served alone) is served the same way under
the id it was given.

A model's kind comes from its manifest: an embedding folder (`task: embed`) loads as an embedder
(serve/embeddings.py), which /v1/embeddings takes with `lease(name, EMBED)` and lets go with the
lease's `release`; anything else loads as a chat engine. `loaders` maps each kind to its loader.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterable

from edge_infer.contract.embedding import TASK_EMBED
from edge_infer.contract.errors import UserError
from edge_infer.contract.model_store import folder_of, parse_name, stored_names
from edge_infer.serve.config import EngineConfig
from edge_infer.serve.engine import Engine
from edge_infer.serve.http_layer import Served, model_not_found
from edge_infer.serve.metrics import Metrics
from edge_infer.serve.protocol import APIError
from edge_infer.serve.registry import CHAT, EMBED, Lease, Loaded, ModelRegistry, RegistryError, RegistrySettings

log = logging.getLogger("edge_infer.serve")

Loader = Callable[[str, Path], Loaded]  # (store name, its folder) -> what requests use


class StoreModels:
    """The ModelResolver of a server of several models, loaded on demand from the model store."""

    def __init__(self, names: list[str] | None, engine_config: EngineConfig, settings: RegistrySettings,
                 device: str = "auto", threads: int | None = None, folders: dict[str, Path] | None = None):
        """names: the store names to serve (None: every model in the store, read again on each lookup);
        folders: models given by path instead, served under these ids (`edge-infer serve FOLDER` of an
        embedding model)."""
        self.folders = dict(folders or {})
        self.fixed = list(self.folders) if folders else None if names is None else [str(parse_name(n)) for n in names]
        self.engine_config, self.device, self.threads = engine_config, device, threads
        self.shutdown_grace_s = engine_config.shutdown_grace_s
        self.loaders: dict[str, Loader] = {CHAT: self._load_chat, EMBED: self._load_embed}
        self.metrics: dict[str, Metrics] = {}  # per model, kept across unloads (counters keep counting)
        self.registry = ModelRegistry(self.ids, self._canonical, self._load, self._estimate, settings)
        self.registry.start()

    # -- the ModelResolver --------------------------------------------------------------------

    def ids(self) -> list[str]:
        return list(self.fixed) if self.fixed is not None else [str(n) for n in stored_names()]

    def resolve(self, name: str | None) -> Served:
        lease = self.lease(name, CHAT)
        return Served(lease.name, lease.handle, lease.release, lease.keep_alive)

    def lease(self, name: str | None, kind: str) -> Lease:
        """A hold on model `name` loaded as `kind` (blocking while it loads); an APIError otherwise."""
        if name is None:
            served = self.ids()
            if len(served) != 1:
                raise APIError(400, "this server serves several models: name one in \"model\" (GET /v1/models)",
                               param="model", code="model_required")
            name = served[0]
        try:
            lease = self.registry.acquire(name)
        except RegistryError as e:
            raise self._answer(name, e) from None
        if lease.kind != kind:
            lease.release()
            route = "/v1/embeddings" if lease.kind == EMBED else "/v1/chat/completions or /v1/completions"
            raise APIError(400, f"model '{lease.name}' is a{'n embedding' if lease.kind == EMBED else ' chat'} "
                           f"model: send it to {route}", param="model", code="wrong_model_kind")
        return lease

    def _answer(self, name: str, e: RegistryError) -> APIError:
        if e.status == 404:
            return model_not_found(name, self.ids())
        headers = {"Retry-After": "1"} if e.retry else {"x-should-retry": "false"}
        return APIError(e.status, e.message, type="server_error", param="model", code=e.code, headers=headers)

    def _canonical(self, name: str) -> str:
        """A request's name as ids() spells it (a folder's id as given; a store name with its tag)."""
        return name if name in self.folders else str(parse_name(name))

    def _folder(self, name: str) -> Path:
        return self.folders[name] if name in self.folders else folder_of(name)

    def lookup(self, name: str) -> str:
        try:
            found = self._canonical(name)
        except UserError:
            found = name
        if found not in self.ids():
            raise model_not_found(name, self.ids())
        return found

    def describe(self, model_id: str) -> dict:
        return {"status": self.registry.status(model_id)}

    def engines(self) -> Iterable[Engine]:
        return [h.handle for h in self.registry.handles().values() if h.kind == CHAT]

    def health(self) -> tuple[bool, dict]:
        models: dict[str, Any] = self.registry.snapshot()
        ok = True
        for name, loaded in self.registry.handles().items():
            if loaded.kind == CHAT:
                alive = loaded.handle.alive
                ok = ok and alive
                models[name].update(loaded.handle.snapshot(), engine="running" if alive else "stopped")
        return ok, {"status": "ok" if ok else "error", "models": models, "served": len(self.ids())}

    def render_metrics(self, metrics: Metrics) -> bytes:
        from edge_infer.serve.metrics import merge_metrics

        names = sorted(self.metrics)
        texts = [metrics.render().decode()] + [self.metrics[n].render().decode() for n in names]
        return merge_metrics(texts, label="model", values=[""] + names).encode()

    def begin_shutdown(self, grace_s: float | None = None) -> None:
        for engine in self.engines():
            engine.begin_shutdown(grace_s)

    def close(self) -> None:
        self.registry.close()

    # -- loading --------------------------------------------------------------------------

    def _estimate(self, name: str) -> int:
        """Bytes the model will take: its files (weights, tokenizer) plus, for a chat model, the KV
        cache of all its slots (the engine commits it when it starts; an embedder keeps none)."""
        from edge_infer.runtime.manifest import load_manifest

        m = load_manifest(self._folder(name), verify=False)
        files = sum(int(f["size"]) for f in m.files.values())
        c = self.engine_config
        return files + m.kv_bytes(batch=c.parallel, max_length=c.max_length)

    def _load(self, name: str) -> Loaded:
        from edge_infer.runtime.manifest import load_manifest

        folder = self._folder(name)
        kind = EMBED if load_manifest(folder, verify=False).task == TASK_EMBED else CHAT
        return self.loaders[kind](name, folder)

    def _load_embed(self, name: str, folder: Path) -> Loaded:
        from edge_infer.serve.embeddings import load_embedder

        embedder = load_embedder(folder, threads=self.threads, device=self.device)
        return Loaded(EMBED, embedder, embedder.close)

    def _load_chat(self, name: str, folder: Path) -> Loaded:
        from edge_infer.runtime.model import load

        model = load(folder, device=self.device, threads=self.threads)  # every file's sha256 checked
        metrics = self.metrics.setdefault(name, Metrics())
        engine = Engine(model, self.engine_config, metrics)
        engine.start()
        log.info("%s: %s %s on %s, %d slots x %d positions", name, model.manifest.geometry.architecture,
                 model.manifest.quant_scheme, model.describe_device(), self.engine_config.parallel, engine.max_length)

        def close() -> None:
            engine.begin_shutdown(0.0)
            engine.stop()
            for gauge in (metrics.active_slots, metrics.queue_depth, metrics.slots_total):
                gauge.set(0)

        return Loaded(CHAT, engine, close)
