"""`edge-infer serve --ray`: the same server on Ray Serve replicas, with prefix-aware routing.

Two kinds of deployment:

  * `replica-{i}` (one Ray Serve deployment per engine, one replica each): loads the model folder
    (hashes verified), owns one `Engine` (continuous batching, prefix cache, speculation as in the
    single-process server) and answers HTTP requests with the very FastAPI app `edge-infer serve`
    runs, called in-process through ASGI (`EngineReplica.asgi`). Security checks (API key, Host
    allow-list, body and parameter bounds) are that app's, unchanged.
  * `router` (the HTTP ingress, no model): reads the body, picks a replica and streams the
    replica's answer back. The pick: the replica most likely to hold the prompt's prefix in its
    cache (rendezvous hashing of the conversation's first messages, or of a completion prompt's
    first characters: a second turn lands where the first one ran), falling back to the
    least-loaded replica when that one is saturated or down. `--routing round-robin` is the
    baseline the benchmark compares against.

Faults: Ray restarts a replica whose process dies (and one whose `check_health` fails). A stream
cut by a dead replica ends with an error event and `[DONE]`; a request whose replica dies before
answering is retried once on another; a replica that failed is avoided for a few seconds.
`/metrics` merges every replica's Prometheus metrics with a `replica` label; `/health` says
which replicas are up.

Each engine is its own deployment rather than N replicas of one, because Ray's HTTP proxy picks
replicas without reading the body, and prefix affinity needs the body.

Offline: Ray reports usage statistics to usage-stats.ray.io by default (ray/_common/usage/usage_lib.py,
sent from the dashboard process, which runs even with include_dashboard=False). `serve_cluster`
switches them off (OFFLINE_ENV) in its own environment before Ray is imported, so every process the
local cluster starts inherits it, and in the job's runtime_env and every deployment's, so workers get
it on a cluster someone else started too (whose head reports unless it was started with
RAY_USAGE_STATS_ENABLED=0 or `ray start --disable-usage-stats`). The rest of Ray's cluster path
stays on the machine: metrics are a local Prometheus endpoint, the dashboard is not started.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from edge_infer.contract.errors import UserError
from edge_infer.serve.metrics import merge_metrics

log = logging.getLogger("edge_infer.cluster")

APP_NAME = "edge-infer"
ROUTINGS = ("prefix", "round-robin")
DOWN_FOR_S = 5.0  # a replica that failed is skipped this long (Ray restarts it meanwhile)
KEY_CHARS = 2048  # of a completion prompt: its start decides the replica
BODY_LIMIT = 1 << 20  # what the router reads; the replica's app answers 413 above its own limit
# Ray's usage statistics off: in this process before Ray starts, and in every worker's runtime_env.
OFFLINE_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}


@dataclass(frozen=True)
class ClusterConfig:
    model: str
    replicas: int = 2
    routing: str = "prefix"
    threads: int = 1  # per replica
    device: str = "cpu"
    verify: bool = True
    server: dict[str, Any] | None = None  # ServerConfig fields
    engine: dict[str, Any] | None = None  # EngineConfig fields
    # --chat-template, read on the driver ({"source", "origin"}: runtime.template_library.TemplateChoice):
    # every replica uses it in place of the folder's own, wherever the replica runs
    chat_template: dict[str, str] | None = None

    def validate(self) -> None:
        if self.replicas < 1:
            raise UserError(f"--replicas must be at least 1, got {self.replicas}")
        if self.routing not in ROUTINGS:
            raise UserError(f"--routing must be one of {', '.join(ROUTINGS)}, got '{self.routing}'")


def routing_key(path: str, body: bytes) -> str | None:
    """What decides the replica: the conversation's first two messages (system + first user turn,
    which every later turn repeats), or the start of a completion prompt. None: no preference."""
    if not body:
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("messages"), list):
        head = data["messages"][:2]
        if isinstance(data.get("system"), (str, list)):  # Anthropic-style top-level system prompt
            head = [data["system"], *data["messages"][:1]]
        return json.dumps(head, sort_keys=True, default=str)
    prompt = data.get("prompt")
    if isinstance(prompt, str):
        return prompt[:KEY_CHARS]
    if isinstance(prompt, list) and prompt:
        return json.dumps(prompt[:KEY_CHARS], default=str)
    return None


def rank_replicas(key: str, n: int) -> list[int]:
    """Rendezvous (highest random weight) order of replicas for `key`: stable, and when one
    replica is out, only its keys move."""
    def weight(i: int) -> bytes:
        return hashlib.blake2b(f"{i}\0{key}".encode("utf-8", "replace"), digest_size=8).digest()

    return sorted(range(n), key=weight, reverse=True)


class Picker:
    """Replica choice with in-flight counts (one router replica owns one Picker)."""

    def __init__(self, n: int, routing: str, saturated_at: int):
        self.n, self.routing, self.saturated_at = n, routing, saturated_at
        self.in_flight = [0] * n
        self.down_until = [0.0] * n
        self._next = 0

    def up(self, i: int) -> bool:
        return time.monotonic() >= self.down_until[i]

    def order(self, key: str | None) -> list[int]:
        """Replicas to try, best first."""
        if self.routing == "round-robin" or key is None:
            start = self._next
            self._next = (self._next + 1) % self.n
            ranked = [(start + k) % self.n for k in range(self.n)]
            if key is None and self.routing == "prefix":  # no prefix to follow: least loaded
                ranked.sort(key=lambda i: self.in_flight[i])
        else:
            ranked = rank_replicas(key, self.n)
            if self.in_flight[ranked[0]] >= self.saturated_at:  # the prefix's home is full: least loaded
                ranked = ranked[:1] + sorted(ranked[1:], key=lambda i: self.in_flight[i])
                if min(self.in_flight[i] for i in ranked[1:] or ranked) < self.in_flight[ranked[0]]:
                    ranked = ranked[1:] + ranked[:1]
        up = [i for i in ranked if self.up(i)]
        return up + [i for i in ranked if i not in up]

    def failed(self, i: int) -> None:
        self.down_until[i] = time.monotonic() + DOWN_FOR_S


# ---- Ray Serve deployments (ray is imported only here, inside functions) ----

def build_application(config: ClusterConfig):
    """The Ray Serve application: N engine deployments and the router. `serve.run` it."""
    from ray import serve

    config.validate()
    server = dict(config.server or {})
    engine = dict(config.engine or {})
    grace = float(engine.get("shutdown_grace_s", 5.0))
    parallel = int(engine.get("parallel", 4))
    # num_cpus 0: threads are the engine's own, Ray's CPU accounting stays out of it. The runtime_env
    # also reaches replicas started by `serve run` (app_builder), where serve_cluster set nothing.
    actor_options = {"num_cpus": 0, "runtime_env": offline_runtime_env()}
    replica_cls: Any = serve.deployment(
        EngineReplica, num_replicas=1, max_ongoing_requests=parallel + int(engine.get("max_queue", 32)) + 4,
        graceful_shutdown_timeout_s=grace + 2, health_check_period_s=2, health_check_timeout_s=30,
        ray_actor_options=actor_options)
    handles = [replica_cls.options(name=f"replica-{i}").bind(config.model, server, engine, config.device,
                                                             config.threads, config.verify, i, config.chat_template)
               for i in range(config.replicas)]
    router_cls: Any = serve.deployment(serve.ingress()(Router), name="router", num_replicas=1,
                                  max_ongoing_requests=4096, graceful_shutdown_timeout_s=grace + 4,
                                  ray_actor_options=actor_options)
    return router_cls.bind(handles, config.routing, parallel)


def app_builder(args: dict[str, str]):
    """For `serve run edge_infer.serve.cluster:app_builder model=PATH replicas=2 ...` and config files.

    args: model (required), replicas, routing, threads, parallel, max_queue, api_key, model_id, chat_template."""
    if "model" not in args:
        raise UserError("app_builder needs model=PATH")
    folder, model_id = model_source(args["model"])
    server = {"model_id": args.get("model_id") or model_id, "api_key": args.get("api_key")}
    engine = {"parallel": int(args.get("parallel", 4)), "max_queue": int(args.get("max_queue", 32))}
    return build_application(ClusterConfig(model=folder, replicas=int(args.get("replicas", 2)),
                                           routing=args.get("routing", "prefix"), threads=int(args.get("threads", 1)),
                                           server=server, engine=engine,
                                           chat_template=read_chat_template(args.get("chat_template"))))


def read_chat_template(spec: str | None) -> dict[str, str] | None:
    """--chat-template NAME|FILE read here, on the driver, for ClusterConfig.chat_template."""
    import dataclasses

    from edge_infer.runtime.template_library import resolve

    return None if spec is None else dataclasses.asdict(resolve(spec))


def model_source(ref: str) -> tuple[str, str]:
    """(the absolute folder every replica loads, the id it is served under) of a model folder or a
    model store name (contract/model_store.py). Replicas serve one model: a server of several models
    loaded on demand (serve/multi.py) runs in one process, without Ray."""
    from edge_infer.contract.model_folder import MANIFEST
    from edge_infer.contract.model_store import resolve_model
    from edge_infer.serve.app import model_id_for

    folder = resolve_model(ref)
    if not (folder / MANIFEST).is_file():
        raise UserError(f"{ref}: not a model folder (no {MANIFEST}) nor a stored model; export one with "
                        "`edge-infer export SRC --name NAME`")
    return str(folder.resolve()), model_id_for(ref)


class EngineReplica:
    """One engine over the model folder, answering HTTP requests through the server's own app."""

    def __init__(self, model: str, server: dict, engine: dict, device: str, threads: int, verify: bool, index: int,
                 chat_template: dict[str, str] | None = None):
        from edge_infer.runtime.model import load
        from edge_infer.runtime.template_library import TemplateChoice, use_template
        from edge_infer.serve.app import build_app
        from edge_infer.serve.config import EngineConfig, ServerConfig

        self.index = index
        m = load(model, device=device, threads=threads, verify=verify)  # hashes checked on every start
        if chat_template is not None:
            use_template(m, TemplateChoice(**chat_template))
        self.app = build_app(m, ServerConfig(**server), EngineConfig(**engine))
        self.engine = self.app.state.engine
        self.engine.start()
        log.info("replica %d ready: %s", index, m.describe_device())

    def begin_shutdown(self, grace_s: float) -> None:
        """Refuse new requests; running ones get grace_s to finish, then end with an error event."""
        self.engine.begin_shutdown(grace_s)

    def check_health(self) -> None:
        if not self.engine.alive:
            raise RuntimeError("the engine's scheduler is not running")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None and engine.alive:
            engine.begin_shutdown(0.0)
            engine.stop()

    async def asgi(self, method: str, path: str, query: bytes, headers: list, body: bytes, client: tuple):
        """Run one HTTP request through the app; yields ("start", status, headers), then ("body", bytes)...

        Closing this generator (the router's client went away) reads as a disconnect to the app,
        which frees the request's slot as in the single-process server."""
        queue: asyncio.Queue = asyncio.Queue()
        disconnected = asyncio.Event()
        sent = False

        async def receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            await queue.put(message)

        async def run():
            try:
                await self.app(scope, receive, send)
            finally:
                await queue.put(None)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query,
                 "root_path": "", "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
                 "client": tuple(client), "server": ("127.0.0.1", 0)}
        task = asyncio.create_task(run())
        try:
            while True:
                message = await queue.get()
                if message is None:
                    break
                if message["type"] == "http.response.start":
                    yield ("start", message["status"],
                           [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])])
                elif message["type"] == "http.response.body":
                    if message.get("body"):
                        yield ("body", bytes(message["body"]))
                    if not message.get("more_body", False):
                        break
        finally:
            disconnected.set()
            try:
                await asyncio.wait_for(task, timeout=10)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - the app logged it; the client is gone
                task.cancel()


class Router:
    """HTTP ingress: forwards every request to the replica `Picker` chooses and streams the answer."""

    def __init__(self, replicas: list, routing: str, parallel: int):
        self.replicas = replicas
        self.picker = Picker(len(replicas), routing, saturated_at=parallel)
        self.routed = [0] * len(replicas)

    async def drain(self, grace_s: float) -> int:
        """Shutdown, step one: every engine stops admitting and finishes (or cleanly ends) its
        streams within grace_s; returns once no request is in flight here (or grace_s + 2 s passed)."""
        await asyncio.gather(*(r.begin_shutdown.remote(grace_s) for r in self.replicas), return_exceptions=True)
        deadline = time.monotonic() + grace_s + 2
        while sum(self.picker.in_flight) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return sum(self.picker.in_flight)

    def __serve_build_asgi_app__(self):
        """Ray calls this on the router replica after __init__: one catch-all route."""
        from fastapi import FastAPI, Request

        app = FastAPI(title="edge-infer router", docs_url=None, redoc_url=None, openapi_url=None)

        async def forward(request):
            return await _forward(self, request)

        forward.__annotations__["request"] = Request  # a real class: FastAPI reads the signature
        app.api_route("/{path:path}", methods=["GET", "POST", "OPTIONS"])(forward)
        return app


async def _forward(self: Router, request):
    from fastapi.responses import Response, StreamingResponse

    body = await _read_bounded(request)
    path = request.url.path
    if path == "/metrics" and request.method == "GET":
        return await _merged_metrics(self, request)
    if path == "/health" and request.method == "GET":
        return await _merged_health(self, request)
    key = routing_key(path, body)
    headers = [(k, v) for k, v in request.headers.items()]
    client = (request.client.host, request.client.port) if request.client else ("127.0.0.1", 0)
    tried: list[int] = []
    for index in self.picker.order(key):
        tried.append(index)
        self.picker.in_flight[index] += 1
        released = False

        def release(i=index):
            nonlocal released
            if not released:
                released = True
                self.picker.in_flight[i] -= 1

        gen = self.replicas[index].options(stream=True).asgi.remote(
            request.method, path, request.url.query.encode(), headers, body, client)
        try:
            first = await gen.__anext__()
        except Exception as e:  # noqa: BLE001 - the replica died or is restarting: try another
            release()
            self.picker.failed(index)
            log.warning("replica %d failed before answering (%s); %s", index, type(e).__name__,
                        "retrying elsewhere" if len(tried) < len(self.replicas) else "no replica left")
            continue
        self.routed[index] += 1
        _, status, resp_headers = first
        streaming = any(k.lower() == "content-type" and v.startswith("text/event-stream") for k, v in resp_headers)

        async def stream(gen=gen, index=index, streaming=streaming, release=release):
            try:
                async for item in gen:
                    yield item[1]
            except Exception as e:  # noqa: BLE001 - cut mid-stream: end cleanly, never hang
                self.picker.failed(index)
                log.warning("replica %d failed mid-stream: %s", index, type(e).__name__)
                if streaming:
                    err = {"error": {"message": "the model replica serving this request failed; retry",
                                     "type": "server_error", "code": "replica_failed"}}
                    yield f"data: {json.dumps(err)}\n\n".encode() + b"data: [DONE]\n\n"
            finally:
                release()
                gen.cancel()

        hop = {"content-length", "transfer-encoding", "connection"}
        out_headers = {k: v for k, v in resp_headers if k.lower() not in hop}
        out_headers["x-edge-infer-replica"] = str(index)
        if streaming:
            return StreamingResponse(stream(), status_code=status, headers=out_headers)
        chunks = [c async for c in stream()]
        return Response(b"".join(chunks), status_code=status, headers=out_headers)
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": "no model replica is available; retry shortly",
                                   "type": "server_error", "code": "no_replica"}},
                        status_code=503, headers={"Retry-After": str(int(DOWN_FOR_S))})


async def _read_bounded(request) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        chunks.append(chunk)
        if size > BODY_LIMIT:  # enough for the replica's app to answer 413
            break
    return b"".join(chunks)


async def _collect(router: Router, index: int, request, path: str) -> tuple[int, bytes]:
    headers = [(k, v) for k, v in request.headers.items()]
    gen = router.replicas[index].options(stream=True).asgi.remote("GET", path, b"", headers, b"", ("127.0.0.1", 0))
    status, body = 503, b""
    async for item in gen:
        if item[0] == "start":
            status = item[1]
        else:
            body += item[1]
    return status, body


async def _merged_metrics(router: Router, request):
    from fastapi.responses import Response

    results = await asyncio.gather(*(asyncio.wait_for(_collect(router, i, request, "/metrics"), 10)
                                     for i in range(len(router.replicas))), return_exceptions=True)
    texts, status = [], 200
    for r in results:
        if isinstance(r, BaseException):
            texts.append("")
            continue
        if r[0] != 200:  # e.g. 401 without the key: answer as the replicas do
            return Response(r[1], status_code=r[0], media_type="application/json")
        texts.append(r[1].decode("utf-8", "replace"))
    routed = "".join(f'edge_infer_router_requests_total{{replica="{i}"}} {n}\n' for i, n in enumerate(router.routed))
    head = "# HELP edge_infer_router_requests_total Requests the router sent to each replica.\n" \
           "# TYPE edge_infer_router_requests_total counter\n"
    return Response(merge_metrics(texts) + head + routed, status_code=status, media_type="text/plain; version=0.0.4")


async def _merged_health(router: Router, request):
    from fastapi.responses import JSONResponse

    results = await asyncio.gather(*(asyncio.wait_for(_collect(router, i, request, "/health"), 10)
                                     for i in range(len(router.replicas))), return_exceptions=True)
    replicas = []
    for i, r in enumerate(results):
        ok = not isinstance(r, BaseException) and r[0] == 200
        replicas.append({"replica": i, "status": "ok" if ok else "down", "in_flight": router.picker.in_flight[i]})
    up = sum(r["status"] == "ok" for r in replicas)
    return JSONResponse({"status": "ok" if up else "error", "replicas_up": up, "replicas": replicas},
                        status_code=200 if up else 503)


def offline_runtime_env() -> dict[str, Any]:
    """The runtime_env that switches Ray's usage statistics off in a worker."""
    return {"env_vars": dict(OFFLINE_ENV)}


def init_ray(address: str | None) -> None:
    """Start a local Ray cluster (address None) or join one, with usage statistics off (OFFLINE_ENV)."""
    os.environ.update(OFFLINE_ENV)  # before ray is imported: it and every process it starts read it
    import ray

    if address:
        ray.init(address=address, logging_level=logging.WARNING, runtime_env=offline_runtime_env())
    else:
        ray.init(include_dashboard=False, logging_level=logging.WARNING, configure_logging=False,
                 runtime_env=offline_runtime_env())


def serve_cluster(config: ClusterConfig, host: str, port: int, address: str | None = None) -> None:
    """Start (or join) Ray, run the application at host:port, and block until SIGTERM / Ctrl-C."""
    import signal
    import threading

    config.validate()
    init_ray(address)
    import ray
    from ray import serve

    serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
    serve.run(build_application(config), name=APP_NAME, route_prefix="/", blocking=False)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        stop.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        grace = float((config.engine or {}).get("shutdown_grace_s", 5.0))
        try:  # streams finish (or end with an error event) before Ray tears the deployments down
            serve.get_app_handle(APP_NAME).drain.remote(grace).result(timeout_s=grace + 30)
        except Exception as e:  # noqa: BLE001 - a cluster already failing still shuts down
            log.warning("drain before shutdown failed: %s", e)
        serve.shutdown()
        ray.shutdown()
