"""The chat page at `/`: static files shipped in the package (serve/ui), no build step, no CDN.

The page talks to this server's own `/v1/models` and `/v1/chat/completions`. Its files are read
once when the app is built and served from a fixed list (no route here takes a file path). They
carry no secret, so they are served without the API key; the page asks for the key when the API
answers 401. A Content-Security-Policy allows scripts and styles from this origin only, so even a
rendering bug could not run a script from model output.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

from edge_infer.serve.protocol import APIError

ASSETS = {"chat.js": "text/javascript", "markdown.js": "text/javascript", "chat.css": "text/css"}
PUBLIC_PATHS = frozenset({"/", *(f"/ui/{name}" for name in ASSETS)})
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def read_asset(name: str) -> bytes:
    return (resources.files("edge_infer.serve") / "ui" / name).read_bytes()


def add_page_routes(app: FastAPI) -> None:
    """GET / (the page) and GET /ui/NAME (its scripts and styles)."""
    files = {name: read_asset(name) for name in ("index.html", *ASSETS)}

    @app.get("/", include_in_schema=False)
    async def page():
        return Response(files["index.html"], media_type="text/html; charset=utf-8", headers=HEADERS)

    @app.get("/ui/{name}", include_in_schema=False)
    async def asset(name: str):
        if name not in ASSETS:
            raise APIError(404, f"no page file named {name!r}", type="not_found")
        return Response(files[name], media_type=ASSETS[name] + "; charset=utf-8", headers=HEADERS)
