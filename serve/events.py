"""Engine events on the event loop, and out over HTTP: a request whose client goes away is cancelled.

`EventQueue` carries one request's events from the engine thread onto the event loop;
`EventStream` sends a Server-Sent Events response and cancels its request when the client
disconnects; `read_reply` collects a non-streamed reply while watching for the same. Used by
serve/http_layer.py (Submission).
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable

import anyio
from fastapi.responses import Response

from edge_infer.serve.request import Delta, Failed, Finished, Handle


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

    def __init__(self, chunks: AsyncIterator[bytes], on_close: Callable[[], None]):
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


async def read_reply(receive, events: EventQueue, handle: Handle) -> tuple[str, Finished | Failed | None]:
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
