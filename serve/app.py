"""The FastAPI app and its OpenAI-compatible routes, a thin translator over serve/http_layer.py.

`make_app` builds the app over a `ModelResolver` (which model a request is
for) and mounts the routers: the server's own (/health, /metrics), the OpenAI
routes here, the Anthropic routes (serve/anthropic.py). A new API is one more
module-level router that reads, prepares, submits and replies through the
layer. The middlewares (Host allow-list, API key, CORS) wrap them all.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import AsyncIterator

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from edge_infer.contract.model_store import is_name, models_root
from edge_infer.serve.config import EngineConfig, ServerConfig
from edge_infer.serve.engine import Engine
from edge_infer.serve.guards import HostGuard, KeyGuard
from edge_infer.serve.http_layer import (Done, ModelResolver, Reasoning, ReleaseHolds, ServerState, Served,
                                         SingleModel, Submission, Text, client_gone, generation, openai_error,
                                         prepare_prompt, read_request, reasoning_split, server_state, service, submit)
from edge_infer.serve.metrics import Metrics
from edge_infer.serve.protocol import (DONE, APIError, ChunkWriter, ParsedRequest, completion_body, new_id,
                                       parse_chat, parse_completion, sse)

log = logging.getLogger("edge_infer.serve")

router = APIRouter()  # the OpenAI routes


def _card(model_id: str) -> dict:
    return {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "edge-infer"}


@router.get("/v1/models")
async def models(request: Request):
    served = server_state(request).models
    return {"object": "list", "data": [{**_card(i), **served.describe(i)} for i in served.ids()]}


@router.get("/v1/models/{model_id:path}")
async def one_model(request: Request, model_id: str):
    served = server_state(request).models
    found = served.lookup(model_id)
    return {**_card(found), **served.describe(found)}


@router.post("/v1/chat/completions")
async def chat(request: Request):
    body, served = await read_request(request)
    state = server_state(request)
    parsed = parse_chat(body, state.config.max_stops, served.vocab_size, state.fields.found)
    return await _generate(request, served, parsed)


@router.post("/v1/completions")
async def completions(request: Request):
    body, served = await read_request(request)
    state = server_state(request)
    parsed = parse_completion(body, state.config.max_stops, served.vocab_size, state.fields.found)
    return await _generate(request, served, parsed)


async def _generate(request: Request, served: Served, parsed: ParsedRequest):
    prepared = await prepare_prompt(served, parsed.prompt, kind=parsed.kind, response_format=parsed.response_format,
                                    tools=parsed.tools, tool_choice=parsed.tool_choice,
                                    parallel_tool_calls=parsed.parallel_tool_calls,
                                    template_kwargs=parsed.template_kwargs)
    rid = new_id(parsed.kind)
    gen = generation(prepared, parsed.max_tokens, parsed.sampling, parsed.stop, rid)
    chat = parsed.kind == "chat"
    submission = submit(served, prepared, gen, "messages" if chat else "prompt",
                        reasoning_split(request, served, prepared) if chat else None)
    if parsed.stream:
        writer = ChunkWriter(parsed.kind, rid, served.model_id, parsed.include_usage)
        return submission.stream(_chunks(writer, submission))
    reply = await submission.collect(request)
    if reply is None:
        return client_gone()
    return completion_body(parsed.kind, rid, served.model_id, reply.content, reply.finish, reply.final.usage,
                           reply.calls, reply.reasoning)


async def _chunks(writer: ChunkWriter, submission: Submission) -> AsyncIterator[bytes]:
    first = writer.start()
    if first:
        yield first
    async for part in submission.parts():
        if isinstance(part, Text):
            yield writer.delta(part.text)
        elif isinstance(part, Reasoning):
            yield writer.reasoning(part.text)
        elif isinstance(part, Done):
            for chunk in writer.tool_calls(part.calls):
                yield chunk
            yield writer.delta("", part.finish)
            tail = writer.usage(part.final.usage)
            if tail:
                yield tail
        else:
            yield sse(APIError(part.status, part.message, type="server_error", code=part.code).body())
    yield DONE


def _install_error_answers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return openai_error(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(e.status_code, str(e.detail), type=kind).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.error("internal error on %s: %s: %s", request.url.path, type(e).__name__, e)
        return JSONResponse(APIError(500, "internal server error", type="server_error").body(), status_code=500)


def make_app(models: ModelResolver, config: ServerConfig, metrics: Metrics) -> FastAPI:
    """The app over `models` (app.state.server: a ServerState; app.state.engine: the first engine)."""
    config.validate()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        for engine in models.engines():
            if not engine.alive:
                engine.start()
        yield
        models.begin_shutdown(0.0)
        await run_in_threadpool(models.close)

    app = FastAPI(title="edge-infer", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server = ServerState.of(config, models, metrics)
    # the first engine (None for a server of several models, which loads them on demand)
    app.state.engine, app.state.metrics = next(iter(models.engines()), None), metrics
    _install_error_answers(app)

    from edge_infer.serve import anthropic  # /v1/messages: the Anthropic Messages API
    from edge_infer.serve import embeddings  # /v1/embeddings
    from edge_infer.serve.page import add_page_routes

    for routes in (service, router, anthropic.router, embeddings.router):
        app.include_router(routes)
    add_page_routes(app)  # the chat page at /
    app.add_middleware(ReleaseHolds)  # innermost: a request's holds on models end with its response
    app.add_middleware(KeyGuard, config=config)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_credentials=False,
                           allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "x-api-key", "anthropic-version"])
    app.add_middleware(HostGuard, config=config, metrics=metrics)
    return app


def create_app(engine: Engine, config: ServerConfig, metrics: Metrics) -> FastAPI:
    """The app of a one-model server."""
    return make_app(SingleModel(engine, config), config, metrics)


def build_app(model, server: ServerConfig, engine: EngineConfig = EngineConfig()) -> FastAPI:
    """An app with its own engine and metrics over a loaded model (app.state.engine, app.state.metrics)."""
    metrics = Metrics()
    return create_app(Engine(model, engine, metrics), server, metrics)


def model_id_for(path: str | Path) -> str:
    """The name a model is served under: a store name as given (a folder in the store: its store
    name), else the folder's name (never a path)."""
    if not Path(path).exists() and is_name(str(path)):
        return str(path)
    folder = Path(path).resolve()
    if folder.parent.parent == models_root().resolve():
        return f"{folder.parent.name}:{folder.name}"
    return folder.name or "model"
