"""The FastAPI app: OpenAI-compatible routes over the engine.

A request is parsed and tokenized here (in a worker thread: a chat template
render is bounded but not free), checked against the context, then handed to
the engine. Engine events cross back to the event loop through
`call_soon_threadsafe`. A client that goes away, streaming or not, cancels its
request at once, so the engine frees the slot at its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from pathlib import Path
from typing import AsyncIterator

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from edge_infer.contract.errors import ContextLengthError, TokenizerError, UserError
from edge_infer.serve.config import EngineConfig, ServerConfig
from edge_infer.serve.engine import Engine, QueueFull, ShuttingDown
from edge_infer.serve.guards import HostGuard, KeyGuard
from edge_infer.serve.metrics import Metrics
from edge_infer.serve.protocol import (DONE, APIError, ChunkWriter, ParsedRequest, bad, completion_body, new_id,
                                       parse_chat, parse_completion, sse)
from edge_infer.serve.request import Delta, Failed, Finished, GenerationRequest
from edge_infer.serve.structured import ReplyStream, prepare, split_reply

log = logging.getLogger("edge_infer.serve")


class EventQueue:
    """Engine events for one request, delivered on the event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def push(self, event) -> None:  # called from the engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def events(self) -> AsyncIterator:
        while True:
            event = await self.queue.get()
            yield event
            if not isinstance(event, Delta):
                return


async def _watch_disconnect(receive, on_disconnect) -> None:
    """Wait for the client to go away (the request body is already read), then call on_disconnect."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            on_disconnect()
            return


class EventStream(Response):
    """A Server-Sent Events response that cancels its request when the client disconnects."""

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[bytes], on_close):
        self.chunks, self.on_close = chunks, on_close
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                def gone() -> None:
                    self.on_close()
                    tg.cancel_scope.cancel()

                tg.start_soon(_watch_disconnect, receive, gone)
                await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
                async for chunk in self.chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                tg.cancel_scope.cancel()
        except OSError:  # the connection broke while sending
            pass
        finally:
            self.on_close()


def create_app(engine: Engine, config: ServerConfig, metrics: Metrics) -> FastAPI:
    config.validate()
    model = engine.model
    vocab = model.manifest.geometry.vocab_size

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if not engine.alive:
            engine.start()
        yield
        engine.begin_shutdown(0.0)
        await run_in_threadpool(engine.stop)

    app = FastAPI(title="edge-infer", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.engine, app.state.metrics = engine, metrics

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(e.status_code, str(e.detail), type=kind).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.error("internal error on %s: %s: %s", request.url.path, type(e).__name__, e)
        return JSONResponse(APIError(500, "internal server error", type="server_error").body(), status_code=500)

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "error", "detail": "the engine is not running"}, status_code=503)
        return {"status": "ok", **engine.snapshot()}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    def model_card() -> dict:
        return {"id": config.model_id, "object": "model", "created": int(time.time()), "owned_by": "edge-infer"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def one_model(model_id: str):
        if not config.serves(model_id):
            raise APIError(404, f"no model named {model_id!r}; this server serves {config.model_id!r}",
                           type="invalid_request_error", param="model", code="model_not_found")
        return model_card()

    async def read_body(request: Request) -> dict:
        body = await read_json(request, config.max_body_bytes)
        name = body.get("model")
        if isinstance(name, str) and not config.serves(name):  # absent: the one model served
            shown = name.encode("utf-8", "backslashreplace").decode()
            raise APIError(404, f"The model '{shown}' does not exist; this server serves '{config.model_id}' "
                           "(GET /v1/models)", type="invalid_request_error", param="model", code="model_not_found")
        return body

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        parsed = parse_chat(await read_body(request), config.max_stops, vocab)
        return await generate(request, parsed)

    @app.post("/v1/completions")
    async def completions(request: Request):
        parsed = parse_completion(await read_body(request), config.max_stops, vocab)
        return await generate(request, parsed)

    async def generate(request: Request, parsed: ParsedRequest):
        field = "messages" if parsed.kind == "chat" else "prompt"
        try:
            prepared = await run_in_threadpool(functools.partial(
                prepare, model, parsed.prompt, kind=parsed.kind, response_format=parsed.response_format,
                tools=parsed.tools, tool_choice=parsed.tool_choice, parallel_tool_calls=parsed.parallel_tool_calls))
        except TokenizerError as e:  # the model's tokenizer broke on this text: ours to fix, retrying won't help
            log.error("tokenizer failed on %s: %s", request.url.path, e)
            raise APIError(500, "the model's tokenizer failed on this text; the model's tokenizer.json is faulty "
                           "for this input", type="server_error", code=e.code,
                           headers={"x-should-retry": "false"}) from None
        except UserError as e:
            raise bad(field, str(e)) from None
        ids = prepared.ids
        rid = new_id(parsed.kind)
        events = EventQueue()
        gen = GenerationRequest(tuple(ids), parsed.max_tokens, parsed.sampling, parsed.stop, rid,
                                constraint=prepared.constraint)
        try:
            handle = engine.submit(gen, events.push)
        except ContextLengthError as e:
            param = "max_tokens" if parsed.max_tokens and len(ids) < engine.max_length else field
            raise APIError(400, str(e), param=param, code=e.code) from None
        except QueueFull as e:
            raise APIError(429, str(e), type="rate_limit_error", code="server_busy",
                           headers={"Retry-After": "1"}) from None
        except ShuttingDown as e:
            raise APIError(503, str(e), type="server_error", code="server_shutting_down") from None
        if parsed.stream:
            return EventStream(stream_chunks(parsed, rid, events, prepared.plan), handle.cancel)
        return await collect(request, parsed, rid, events, handle, prepared.plan)

    async def collect(request: Request, parsed: ParsedRequest, rid: str, events: EventQueue, handle, plan=None):
        text, final = await read_reply(request.receive, events, handle)
        if final is None or (isinstance(final, Finished) and final.finish_reason == "cancelled"):
            return Response(status_code=499)  # the client is gone; nobody reads this
        if isinstance(final, Failed):
            raise APIError(final.status, final.message, type="server_error", code=final.code)
        content, calls, finish = split_reply(text, final.finish_reason, plan)
        return completion_body(parsed.kind, rid, config.model_id, content, finish, final.usage, calls)

    async def stream_chunks(parsed: ParsedRequest, rid: str, events: EventQueue, plan=None) -> AsyncIterator[bytes]:
        writer = ChunkWriter(parsed.kind, rid, config.model_id, parsed.include_usage)
        reply = ReplyStream(plan)
        first = writer.start()
        if first:
            yield first
        async for event in events.events():
            if isinstance(event, Delta):
                text = reply.feed(event.text)
                if text:
                    yield writer.delta(text)
            elif isinstance(event, Finished):
                if event.finish_reason == "cancelled":
                    return
                text, calls, finish = reply.finish(event.finish_reason)
                if text:
                    yield writer.delta(text)
                for chunk in writer.tool_calls(calls):
                    yield chunk
                yield writer.delta("", finish)
                tail = writer.usage(event.usage)
                if tail:
                    yield tail
            else:
                yield sse(APIError(event.status, event.message, type="server_error", code=event.code).body())
        yield DONE

    from edge_infer.serve.anthropic import add_routes  # /v1/messages: the Anthropic Messages API
    from edge_infer.serve.page import add_page_routes

    add_routes(app, engine, config, read_json, EventQueue, EventStream, read_reply)
    add_page_routes(app)  # the chat page at /

    app.add_middleware(KeyGuard, config=config)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_credentials=False,
                           allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "x-api-key", "anthropic-version"])
    app.add_middleware(HostGuard, config=config, metrics=metrics)
    return app


async def read_reply(receive, events: EventQueue, handle) -> tuple[str, Finished | Failed | None]:
    """A non-streamed request's whole text and its final event (None: the client left first, and
    its request was cancelled so the slot frees at the next step)."""
    parts: list[str] = []
    final: Finished | Failed | None = None
    async with anyio.create_task_group() as tg:
        def gone() -> None:
            handle.cancel()
            tg.cancel_scope.cancel()

        tg.start_soon(_watch_disconnect, receive, gone)
        async for event in events.events():
            if isinstance(event, Delta):
                parts.append(event.text)
            else:
                final = event
        tg.cancel_scope.cancel()
    return "".join(parts), final


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


def build_app(model, server: ServerConfig, engine: EngineConfig = EngineConfig()) -> FastAPI:
    """An app with its own engine and metrics over a loaded model (app.state.engine, app.state.metrics)."""
    metrics = Metrics()
    return create_app(Engine(model, engine, metrics), server, metrics)


def model_id_for(path: str | Path) -> str:
    """The name a model folder is served under: the folder's name, never its full path."""
    return Path(path).resolve().name or "model"
