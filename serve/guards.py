"""ASGI middlewares in front of the routes: Host allow-list, API key, request counting.

The stack, outermost first:

  HostGuard   counts every request by route and status; refuses a Host header
              that does not name this server (DNS rebinding), even on /health
  CORS        only when --cors-origin names origins (never a wildcard); it
              answers preflights, which carry no key
  KeyGuard    every route but /health and the chat page's files needs `Authorization: Bearer KEY` (or
              `x-api-key: KEY`, as Anthropic's clients send it) when a key is
              set (constant-time compare); POST bodies must be JSON and
              at most max_body_bytes by their Content-Length
"""

from __future__ import annotations

import hmac
import json

from edge_infer.serve.config import ServerConfig
from edge_infer.serve.metrics import Metrics, route_label
from edge_infer.serve.page import PUBLIC_PATHS
from edge_infer.serve.protocol import APIError

OPEN_PATHS = frozenset({"/health"}) | PUBLIC_PATHS  # the chat page's files hold no secret


async def send_error(send, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v.decode("latin-1")
    return None


class HostGuard:
    def __init__(self, app, config: ServerConfig, metrics: Metrics):
        self.app, self.config, self.metrics = app, config, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = route_label(scope.get("path", ""))
        status = {"code": 500}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if not self.config.host_allowed(_header(scope, b"host")):
                await send_error(counting_send, APIError(
                    400, "the Host header does not name this server; start it with --allowed-host NAME to "
                    "accept that name", code="invalid_host"))
                return
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.requests.labels(route, str(status["code"])).inc()


class KeyGuard:
    def __init__(self, app, config: ServerConfig):
        self.app, self.config = app, config
        self._key = config.api_key.encode() if config.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self._key is not None and scope.get("path") not in OPEN_PATHS and not self._authorized(scope):
            await send_error(send, APIError(
                401, "a valid API key is required: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"}))
            return
        if scope.get("method") == "POST":
            length = _header(scope, b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.config.max_body_bytes):
                await send_error(send, APIError(
                    413, f"the request body is larger than {self.config.max_body_bytes} bytes",
                    code="request_too_large"))
                return
            kind = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
            if kind != "application/json":
                # Also a CSRF guard: a web page cannot send a JSON content type cross-origin without a preflight.
                await send_error(send, APIError(415, "the request body must be JSON with "
                                                     "'Content-Type: application/json'", code="unsupported_media_type"))
                return
        await self.app(scope, receive, send)

    def _authorized(self, scope) -> bool:
        assert self._key is not None  # called only when a key is set
        api_key = _header(scope, b"x-api-key")
        if api_key is not None:
            return hmac.compare_digest(api_key.strip().encode("latin-1"), self._key)
        value = _header(scope, b"authorization") or ""
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(token.strip().encode("latin-1"), self._key)
