"""Running the app under uvicorn: in the foreground (the CLI) or on a background thread (tests, benchmarks).

Shutdown on SIGTERM or Ctrl-C: uvicorn stops accepting connections; the
engine refuses new requests and gives running ones `shutdown_grace_s` to
finish, then ends them with an error event; the process exits 0.
"""

from __future__ import annotations

import signal
import socket
import threading
import time

import uvicorn

from edge_infer.contract.errors import UserError


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, models):
        super().__init__(config)
        self.models = models  # the app's ModelResolver: its engines drain on SIGTERM

    def handle_exit(self, sig, frame) -> None:
        self.models.begin_shutdown()  # only sets fields: safe inside a signal handler
        super().handle_exit(sig, frame)


def _uvicorn_config(app, models, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(app, log_level=log_level, access_log=log_level == "debug", server_header=False,
                          timeout_graceful_shutdown=int(models.shutdown_grace_s) + 2, lifespan="on",
                          h11_max_incomplete_event_size=64 * 1024)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve_forever(app, sock: socket.socket, log_level: str = "info") -> None:
    """Serve on a bound socket until SIGTERM / SIGINT; returns normally so the process exits 0."""
    models = app.state.server.models
    server = _Server(_uvicorn_config(app, models, log_level), models)
    # uvicorn re-raises the caught signal after shutdown with the handler it found: make that a no-op
    # for SIGTERM, so a clean shutdown ends with exit code 0 rather than death by signal.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)


class ServerThread:
    """The app on a free loopback port in a background thread: `with ServerThread(app) as s: s.url`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.app = app
        self.sock = bind(host, port)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.engine = app.state.engine  # None for a server of several models
        self.models = app.state.server.models
        self.server = _Server(_uvicorn_config(app, self.models, log_level), self.models)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="edge-infer-server", daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self.models.begin_shutdown(0.0)
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()
