"""One HTTP layer under every API the server speaks (OpenAI, Anthropic, and whatever is added next).

A protocol module is a thin translator: it turns its request body into a prompt
and a `GenerationRequest`, and this layer's parts back into its own answers.
Everything else happens here, once:

  read      the body (at most max_body_bytes, a JSON object; llama-server's
            and Ollama's extras moved onto our fields, serve/fields.py) and
            the model it names, resolved by the app's `ModelResolver` (one
            message for a model this server does not serve)
  prepare   template, tokenize and compile the output grammar, in a worker
            thread (a chat template render is bounded but not free)
  submit    to the resolved model's engine; its refusals become HTTP answers
            (context too long 400, queue full 429, shutting down 503)
  reply     the engine's events as protocol-neutral parts (`Reasoning`, `Text`,
            `Done`, `Failed`), streamed, or collected into one `Reply`; a
            client that goes away cancels its request at once, so the engine
            frees the slot at its next step (serve/events.py)
  errors    `APIError` is answered in the OpenAI shape by the app; a protocol
            with another shape mounts its router with `error_route(render)`

The app's state holds a `ServerState`: the server's settings, its metrics and
the resolver that maps a request's "model" to one served model: `SingleModel`,
or serve/multi.py's `StoreModels` for a server of several models loaded on
demand. A resolver may block while a model loads (read_request calls it in a
worker thread) and may hand out a hold on the model with it (`Served.release`),
which `ReleaseHolds` lets go once the whole response is sent.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterable, Protocol, Union

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from edge_infer.contract.errors import ContextLengthError, TokenizerError, UserError
from edge_infer.runtime.reasoning import (CONTENT, REASONING, ReasoningSplitter, emits_thinking, opens_thinking,
                                          split_reasoning)
from edge_infer.runtime.tools import ToolCall
from edge_infer.serve.config import ServerConfig
from edge_infer.serve.engine import Engine, QueueFull, ShuttingDown
from edge_infer.serve.events import EventQueue, EventStream, read_reply
from edge_infer.serve.fields import LENIENT, UnknownFields, llama_and_ollama_extras, request_keep_alive
from edge_infer.serve.metrics import Metrics
from edge_infer.serve.protocol import APIError, bad
from edge_infer.serve.request import Delta, Failed, Finished, GenerationRequest, Handle
from edge_infer.serve.structured import Prepared, ReplyStream, prepare, split_reply

log = logging.getLogger("edge_infer.serve")


# -- which model a request is for --------------------------------------------------------


@dataclass(frozen=True)
class Served:
    """A model a request resolved to: the id replies carry and the engine that runs it."""

    model_id: str
    engine: Engine
    release: Callable[[], None] | None = None  # a hold on the model, let go after the response
    keep_alive: Callable[[float], None] | None = None  # how long the model stays after this request (seconds)

    @property
    def model(self):
        return self.engine.model

    @property
    def vocab_size(self) -> int:
        return self.engine.model.manifest.geometry.vocab_size


class ModelResolver(Protocol):
    """Maps a request's "model" to a served model (None: the request named none)."""

    shutdown_grace_s: float  # how long running requests get on SIGTERM

    def resolve(self, name: str | None) -> Served: ...  # raises model_not_found; may block while it loads
    def lookup(self, name: str) -> str: ...  # the id `name` is served under, loading nothing
    def ids(self) -> list[str]: ...  # what /v1/models lists
    def describe(self, model_id: str) -> dict: ...  # more fields of its /v1/models entry
    def engines(self) -> Iterable[Engine]: ...  # the running engines (lifespan starts them)
    def health(self) -> tuple[bool, dict]: ...  # (all well, the /health body)
    def render_metrics(self, metrics: Metrics) -> bytes: ...  # the /metrics text
    def begin_shutdown(self, grace_s: float | None = None) -> None: ...  # signal-safe: only sets fields
    def close(self) -> None: ...  # after the server stopped: stop every engine


def model_not_found(name: str, served: list[str]) -> APIError:
    """The one answer to a request for a model this server does not serve."""
    shown = name.encode("utf-8", "backslashreplace").decode()  # a lone surrogate must not break the JSON
    listed = ", ".join(f"'{s}'" for s in served)
    return APIError(404, f"The model '{shown}' does not exist; this server serves {listed} (GET /v1/models; "
                    "serve a model under another name with --model-alias)", type="invalid_request_error",
                    param="model", code="model_not_found")


class SingleModel:
    """A one-model server: its id and its aliases name it; a request that names no model gets it."""

    def __init__(self, engine: Engine, config: ServerConfig):
        self.served = Served(config.model_id, engine)
        self.config = config
        self.shutdown_grace_s = engine.config.shutdown_grace_s

    def resolve(self, name: str | None) -> Served:
        if name is None or self.config.serves(name):
            return self.served
        raise model_not_found(name, self.ids())

    def lookup(self, name: str) -> str:
        return self.resolve(name).model_id

    def ids(self) -> list[str]:
        return [self.config.model_id]

    def describe(self, model_id: str) -> dict:
        return {}

    def engines(self) -> list[Engine]:
        return [self.served.engine]

    def health(self) -> tuple[bool, dict]:
        engine = self.served.engine
        if not engine.alive:
            return False, {"status": "error", "detail": "the engine is not running"}
        return True, {"status": "ok", **engine.snapshot()}

    def render_metrics(self, metrics: Metrics) -> bytes:
        return metrics.render()

    def begin_shutdown(self, grace_s: float | None = None) -> None:
        self.served.engine.begin_shutdown(grace_s)

    def close(self) -> None:
        self.served.engine.stop()


@dataclass
class ServerState:
    """What every route reads from `request.app.state.server`."""

    config: ServerConfig
    models: ModelResolver
    metrics: Metrics
    fields: UnknownFields = LENIENT  # unknown request fields: refused (--strict) or ignored and counted

    @classmethod
    def of(cls, config: ServerConfig, models: ModelResolver, metrics: Metrics) -> "ServerState":
        count = lambda name: metrics.ignored_fields.labels(name).inc()  # noqa: E731
        return cls(config, models, metrics, UnknownFields(strict=config.strict, count=count))


def server_state(request: Request) -> ServerState:
    return request.app.state.server


# -- reading a request ---------------------------------------------------------------------


async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object, read at most `limit` bytes (chunked bodies have no Content-Length)."""
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return data


async def read_request(request: Request) -> tuple[dict, Served]:
    """The body and the model it names (a 404 for a model not served here; a model that is not
    loaded yet is loaded, or waited for, in a worker thread)."""
    state = server_state(request)
    raw = await read_json(request, state.config.max_body_bytes)
    body = llama_and_ollama_extras(raw, state.fields)
    keep = None if state.fields.strict else request_keep_alive(raw)  # checked before any model loads
    name = body.get("model")
    served = await resolve_model(request, name if isinstance(name, str) else None)
    keep_model(served, keep, state.fields)
    return body, served


def keep_model(served: Served, seconds: float | None, fields: UnknownFields) -> None:
    """A request's keep_alive: how long a server of several models keeps the model after this request;
    a one-model server holds its model for its whole life and says once that it ignores it."""
    if seconds is None:
        return
    if served.keep_alive is not None:
        served.keep_alive(seconds)
    else:
        fields.ignored("keep_alive", "this server holds its one model for its whole life; keep_alive applies to "
                       "`edge-infer serve` of several models")


async def resolve_model(request: Request, name: str | None) -> Served:
    """`name` resolved by the app's resolver; a hold it hands out is let go after the response."""
    served = await run_in_threadpool(server_state(request).models.resolve, name)
    if served.release is not None:
        hold(request, served.release)
    return served


HOLDS = "edge_infer_holds"


def hold(request: Request, release: Callable[[], None]) -> None:
    """Call `release` once this request's response is sent (or failed); see ReleaseHolds."""
    holds = request.scope.get("state", {}).get(HOLDS)
    if holds is None:  # an app without ReleaseHolds: let go now rather than never
        release()
        return
    holds.append(release)


class ReleaseHolds:
    """ASGI middleware: runs each request's hold releases after its whole response (a stream
    included) has been sent, or the request failed or was cancelled."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        holds: list[Callable[[], None]] = []
        scope.setdefault("state", {})[HOLDS] = holds
        try:
            await self.app(scope, receive, send)
        finally:
            for release in holds:
                release()


async def prepare_prompt(served: Served, prompt: Any, *, kind: str, **options) -> Prepared:
    """Template, tokenize and compile in a worker thread; a bad prompt is a 400 naming its field, a
    tokenizer that breaks on the text is a 500 that says not to retry."""
    field = "messages" if kind == "chat" else "prompt"
    try:
        return await run_in_threadpool(functools.partial(prepare, served.model, prompt, kind=kind, **options))
    except TokenizerError as e:  # the model's tokenizer broke on this text: ours to fix, retrying won't help
        log.error("tokenizer failed on a %s request: %s", kind, e)
        raise APIError(500, "the model's tokenizer failed on this text; the model's tokenizer.json is faulty "
                       "for this input", type="server_error", code=e.code,
                       headers={"x-should-retry": "false"}) from None
    except UserError as e:
        raise bad(field, str(e)) from None


# -- submitting and replying ------------------------------------------------------------------


@dataclass(frozen=True)
class Text:
    """Reply text to send now."""

    text: str


@dataclass(frozen=True)
class Reasoning:
    """Reasoning text (the reply's `<think>` block) to send now."""

    text: str


@dataclass(frozen=True)
class Done:
    """The reply ended: its tool calls (already parsed), finish reason, and the engine's final event."""

    calls: list[ToolCall]
    finish: str
    final: Finished


Part = Union[Text, Reasoning, Done, Failed]


@dataclass(frozen=True)
class Reply:
    """A whole reply, for a request that does not stream."""

    content: str | None
    calls: list[ToolCall]
    finish: str
    final: Finished
    reasoning: str | None = None  # the `<think>` text, when it is split off


class Submission:
    """A request in the engine: its events, as parts to stream or one reply to collect.

    `inside`: None when the reply's `<think>` text is not split off (--reasoning-format none, a
    template without thinking, a text completion); else whether the reply starts inside the block."""

    def __init__(self, handle: Handle, events: EventQueue, prepared: Prepared, inside: bool | None = None):
        self.handle, self.events, self.prepared, self.inside = handle, events, prepared, inside

    async def parts(self) -> AsyncIterator[Part]:
        """Reasoning and text as they may be sent (tool calls held back until they parse), then `Done`
        or `Failed`; nothing more after a cancel."""
        reply = ReplyStream(self.prepared.plan)
        thinking = ReasoningSplitter(self.inside) if self.inside is not None else None
        async for event in self.events.events():
            if isinstance(event, Delta):
                for part in _pieces(thinking.feed(event.text) if thinking else [(CONTENT, event.text)], reply):
                    yield part
            elif isinstance(event, Finished):
                if event.finish_reason == "cancelled":
                    return
                for part in _pieces(thinking.finish() if thinking else [], reply):
                    yield part
                text, calls, finish = reply.finish(event.finish_reason)
                if text:
                    yield Text(text)
                yield Done(calls, finish, event)
            else:
                yield event

    def stream(self, chunks: AsyncIterator[bytes]) -> "EventStream":
        """An SSE response of `chunks` (the protocol's rendering of `parts()`) that cancels on disconnect."""
        return EventStream(chunks, self.handle.cancel)

    async def collect(self, request: Request) -> Reply | None:
        """The whole reply; None when the client left first (its request was cancelled). A failed
        generation raises its APIError."""
        text, final = await read_reply(request.receive, self.events, self.handle)
        if final is None or (isinstance(final, Finished) and final.finish_reason == "cancelled"):
            return None
        if isinstance(final, Failed):
            raise APIError(final.status, final.message, type="server_error", code=final.code)
        reasoning = None
        if self.inside is not None:
            reasoning, text = split_reasoning(text, self.inside)
        content, calls, finish = split_reply(text, final.finish_reason, self.prepared.plan)
        return Reply(content, calls, finish, final, reasoning)


def _pieces(pieces: list[tuple[str, str]], reply: ReplyStream) -> list[Part]:
    """Reasoning pieces as they are; answer text through the tool-call hold-back."""
    out: list[Part] = []
    for kind, text in pieces:
        if kind == REASONING:
            out.append(Reasoning(text))
        elif text := reply.feed(text):
            out.append(Text(text))
    return out


def reasoning_split(request: Request, served: Served, prepared: Prepared) -> bool | None:
    """For a chat reply: None when its `<think>` text stays in the content (--reasoning-format none, or
    a template that does not think), else whether the prompt left the reply inside the block."""
    model = served.model
    if server_state(request).config.reasoning_format == "none" or not emits_thinking(model.chat_template):
        return None
    return opens_thinking(model.tokenizer.decode(list(prepared.ids[-32:]), skip_special_tokens=False))


CLIENT_GONE = 499  # nobody reads this answer: the client went away before the reply was whole


def client_gone() -> Response:
    return Response(status_code=CLIENT_GONE)


def submit(served: Served, prepared: Prepared, gen: GenerationRequest, field: str,
           inside: bool | None = None) -> Submission:
    """Queue `gen` on the served model's engine; its refusals are HTTP answers (`field`: what holds the
    prompt; `inside`: see Submission)."""
    events = EventQueue()
    engine = served.engine
    try:
        handle = engine.submit(gen, events.push)
    except ContextLengthError as e:
        param = "max_tokens" if gen.max_tokens and len(gen.prompt_ids) < engine.max_length else field
        raise APIError(400, str(e), param=param, code=e.code) from None
    except QueueFull as e:
        raise APIError(429, str(e), type="rate_limit_error", code="server_busy", headers={"Retry-After": "1"}) from None
    except ShuttingDown as e:
        raise APIError(503, str(e), type="server_error", code="server_shutting_down") from None
    return Submission(handle, events, prepared, inside)


def generation(prepared: Prepared, max_tokens: int | None, sampling, stop: tuple[str, ...],
               request_id: str) -> GenerationRequest:
    return GenerationRequest(tuple(prepared.ids), max_tokens, sampling, stop, request_id,
                             constraint=prepared.constraint, tool_plan=prepared.plan)


# -- error answers ------------------------------------------------------------------------------


def openai_error(e: APIError) -> JSONResponse:
    """The app's default error answer: {"error": {"message", "type", "param", "code"}}."""
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def error_route(render: Callable[[APIError], Response]) -> type[APIRoute]:
    """A route class for a router whose protocol answers errors in its own shape (pass it as the
    APIRouter's route_class); errors raised before the route runs keep the app's OpenAI shape."""

    class ProtocolRoute(APIRoute):
        def get_route_handler(self):
            handler = super().get_route_handler()

            async def answer(request: Request) -> Response:
                try:
                    return await handler(request)
                except APIError as e:
                    return render(e)

            return answer

    return ProtocolRoute


# -- the server's own routes ------------------------------------------------------------------------

service = APIRouter()


@service.get("/health")
async def health(request: Request):
    ok, body = server_state(request).models.health()
    return body if ok else JSONResponse(body, status_code=503)


@service.get("/metrics")
async def prometheus(request: Request):
    state = server_state(request)
    return Response(state.models.render_metrics(state.metrics), media_type=state.metrics.content_type)


def route_table(app) -> set[tuple[tuple[str, ...], str]]:
    """Every (methods, path) the app answers, through included routers (FastAPI includes them lazily)."""
    table: set[tuple[tuple[str, ...], str]] = set()
    pending = list(app.routes)
    while pending:
        route = pending.pop()
        included = getattr(route, "original_router", None)
        if included is not None:
            pending += included.routes
        elif getattr(route, "methods", None):
            table.add((tuple(sorted(route.methods)), route.path))
    return table
