"""POST /v1/embeddings: OpenAI's embeddings API over an embedding model folder (runtime/embed.py).

    {"model": "bge-small", "input": "text" | ["text", ...] | [ids] | [[ids], ...],
     "encoding_format": "float" | "base64", "dimensions": 256}
  -> {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [...] | "base64"}],
      "model": "bge-small", "usage": {"prompt_tokens": n, "total_tokens": n}}

An embedding model is held by the server's model registry like a chat model (serve/multi.py
loads it with `load_embedder` for the `embed` kind). `dimensions` is honoured only where the
model's export records Matryoshka training (truncate, then renormalize); elsewhere it is a 400
that says so. A chat model asked to embed, an empty or too long input, or a token id outside the
vocabulary is a 400 naming the field and what to do. The pass runs in a worker thread, one at a
time per model (onnxruntime already uses every core the model was given).
"""

from __future__ import annotations

import base64
import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from edge_infer.contract.errors import ContextLengthError, UserError
from edge_infer.runtime.embed import Embeddings, EmbeddingModel, load_embedding
from edge_infer.serve.fields import request_keep_alive
from edge_infer.serve.http_layer import read_json, server_state
from edge_infer.serve.protocol import APIError, bad

router = APIRouter()
MAX_INPUTS = 2048  # texts per request, as OpenAI's API
EMBED = "embed"  # the registry's kind of an embedding model (serve/registry.py)


@dataclass(frozen=True)
class EmbeddingRequest:
    texts: list[str] | None  # either texts ...
    ids: list[list[int]] | None  # ... or token ids
    encoding_format: str  # "float" | "base64"
    dimensions: int | None


class Embedder:
    """One loaded embedding model as the server holds it: passes one at a time."""

    def __init__(self, model: EmbeddingModel):
        self.model = model
        self._lock = threading.Lock()

    def run(self, req: EmbeddingRequest) -> Embeddings:
        with self._lock:
            ids = req.ids if req.ids is not None else self.model.tokenize(req.texts or [])
            return self.model.embed_ids(ids, req.dimensions)

    def close(self) -> None:
        self.model.session = None  # the session's memory goes with its last reference


def load_embedder(folder, threads: int | None = None, device: str = "auto") -> Embedder:
    """What the model registry holds for an embedding folder (its loader for the `embed` kind)."""
    return Embedder(load_embedding(folder, threads=threads, device=device))


def parse_embedding_request(body: dict) -> EmbeddingRequest:
    """The request's fields, checked; a bad one is a 400 naming it."""
    raw = body.get("input")
    texts, ids = _inputs(raw)
    fmt = body.get("encoding_format", "float") or "float"
    if fmt not in ("float", "base64"):
        raise bad("encoding_format", f"encoding_format must be 'float' or 'base64', got {fmt!r:.40}")
    dims = body.get("dimensions")
    if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool) or dims < 1):
        raise bad("dimensions", f"dimensions must be a positive integer, got {dims!r:.40}")
    return EmbeddingRequest(texts, ids, fmt, dims)


def _inputs(raw: Any) -> tuple[list[str] | None, list[list[int]] | None]:
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise bad("input", "input must be a non-empty string, a list of strings, a list of token ids or a list of "
                  "lists of token ids")
    if len(raw) > MAX_INPUTS:
        raise bad("input", f"input holds {len(raw)} items; send at most {MAX_INPUTS} per request")
    if all(isinstance(t, str) for t in raw):
        empty = next((i for i, t in enumerate(raw) if not t), None)
        if empty is not None:
            raise bad("input", f"input[{empty}] is an empty string: there is nothing to embed")
        return list(raw), None
    if all(_is_id(t) for t in raw):
        return None, [list(raw)]
    if all(isinstance(r, list) and r and all(_is_id(t) for t in r) for r in raw):
        return None, [list(r) for r in raw]
    raise bad("input", "input must be a string, a list of strings, a list of token ids or a list of non-empty lists "
              "of token ids (not a mix)")


def _is_id(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def embedding_body(result: Embeddings, model_id: str, fmt: str) -> dict:
    data = []
    for i, v in enumerate(result.vectors):  # v: (dimensions,) float32
        vec: Any = base64.b64encode(np.ascontiguousarray(v, "<f4").tobytes()).decode() if fmt == "base64" else v.tolist()
        data.append({"object": "embedding", "index": i, "embedding": vec})
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    return {"object": "list", "data": data, "model": model_id, "usage": usage}


async def embed_request(embedder: Embedder, model_id: str, req: EmbeddingRequest) -> dict:
    """Run one request on `embedder` in a worker thread; user mistakes become 400s naming the field."""
    try:
        embedder.model.check_dimensions(req.dimensions)
    except UserError as e:
        raise bad("dimensions", str(e)) from None
    try:
        result = await run_in_threadpool(embedder.run, req)
    except ContextLengthError as e:
        raise bad("input", str(e), code=e.code) from None
    except UserError as e:
        raise bad("input", str(e)) from None
    return embedding_body(result, model_id, req.encoding_format)


@router.post("/v1/embeddings")
async def embeddings(request: Request):
    state = server_state(request)
    body = await read_json(request, state.config.max_body_bytes)
    req = parse_embedding_request(body)
    keep = None if state.fields.strict else request_keep_alive(body)  # Ollama's keep_alive, as on chat routes
    name = body.get("model")
    model_id, embedder, release = await _lease(state.models, name if isinstance(name, str) else None, keep)
    try:
        return await embed_request(embedder, model_id, req)
    finally:
        release()


async def _lease(models: Any, name: str | None, keep_alive: float | None = None
                 ) -> tuple[str, Embedder, Callable[[], None]]:
    """The embedding model a request names, held until `release()`: from a registry of several models
    (serve/multi.py: loaded on first use; `keep_alive` seconds after this request, when given), or a
    clear 400 from a one-model server of a chat model."""
    if hasattr(models, "lease"):  # a registry: may block while the model loads
        lease = await run_in_threadpool(models.lease, name, EMBED)
        if keep_alive is not None:
            lease.keep_alive(keep_alive)
        return lease.name, lease.handle, lease.release
    served = models.resolve(name)  # a one-model server: a 404 for a name it does not serve
    raise APIError(400, f"model '{served.model_id}' is a text-generation model and has no embeddings: serve an "
                   "embedding model beside it (`edge-infer export SRC --task embed --name NAME`, then "
                   "`edge-infer serve` with no model or with both names)", param="model", code="wrong_model_kind")
