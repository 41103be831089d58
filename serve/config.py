"""Server and engine settings: frozen dataclasses, checked before anything loads.

The security defaults live here: loopback bind, a key required off loopback,
a Host allow-list against DNS rebinding, CORS only for named origins.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edge_infer.contract.errors import UserError

if TYPE_CHECKING:
    from edge_infer.runtime.speculative import SpeculativeConfig

LOOPBACK_NAMES = frozenset({"localhost"})
MAX_BODY_BYTES = 1 << 20  # 1 MiB
MAX_STOPS = 4  # as the OpenAI API


def is_loopback(host: str) -> bool:
    """True for 'localhost' and loopback IP literals (127.0.0.0/8, ::1)."""
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class EngineConfig:
    parallel: int = 4  # slots: sequences decoded together in one batched step
    max_queue: int = 32  # requests waiting for a slot; beyond this a request gets 429
    max_length: int | None = None  # positions per slot; None = the model's exported max_length
    prefill_chunk: int = 256  # prompt tokens per scheduler step: bounds how long a new prompt stalls others
    default_max_tokens: int | None = None  # when a request names none; None = the rest of the context
    shutdown_grace_s: float = 5.0  # on SIGTERM, active streams get this long to finish
    # Speculate while a single request decodes (with several, the batched step already uses the
    # machine); the output is unchanged.
    speculative: SpeculativeConfig | None = None

    def validate(self) -> None:
        if not 1 <= self.parallel <= 256:
            raise UserError(f"--parallel must be between 1 and 256, got {self.parallel}")
        if not 0 <= self.max_queue <= 65536:
            raise UserError(f"--max-queue must be between 0 and 65536, got {self.max_queue}")
        if self.max_length is not None and self.max_length < 2:
            raise UserError(f"--max-length must be at least 2, got {self.max_length}")
        if self.prefill_chunk < 1:
            raise UserError(f"--prefill-chunk must be at least 1, got {self.prefill_chunk}")
        if self.default_max_tokens is not None and self.default_max_tokens < 1:
            raise UserError(f"--default-max-tokens must be at least 1, got {self.default_max_tokens}")
        if self.shutdown_grace_s < 0:
            raise UserError(f"the shutdown grace must be >= 0 seconds, got {self.shutdown_grace_s}")


@dataclass(frozen=True)
class ServerConfig:
    model_id: str  # the name /v1/models lists and responses carry (never a path)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    allowed_hosts: tuple[str, ...] = ()  # Host header names accepted besides loopback ones
    cors_origins: tuple[str, ...] = ()  # exact origins; empty = no CORS headers at all
    max_body_bytes: int = MAX_BODY_BYTES
    max_stops: int = MAX_STOPS
    model_aliases: tuple[str, ...] = ()  # other names a request's "model" may give (--model-alias)
    strict: bool = False  # unknown request fields are a 400 (--strict), not ignored and counted
    reasoning_format: str = "separate"  # none | separate: a thinking template's <think> text as reasoning_content

    def serves(self, name: str) -> bool:
        """Whether a request naming model `name` is for this server (OpenAI answers 404 otherwise)."""
        return name == self.model_id or name in self.model_aliases

    def validate(self) -> None:
        if self.reasoning_format not in ("none", "separate"):
            raise UserError(f"--reasoning-format must be none or separate, got {self.reasoning_format!r}")
        if not is_loopback(self.host) and not self.api_key:
            raise UserError(
                f"--host {self.host} is reachable from other machines, so it needs an API key: pass "
                f"--api-key-file FILE (or --api-key / EDGE_INFER_API_KEY), or bind 127.0.0.1"
            )
        if self.api_key is not None and (not self.api_key or self.api_key != self.api_key.strip()):
            raise UserError("the API key is empty or has surrounding whitespace")
        for origin in self.cors_origins:
            if origin == "*" or "*" in origin:
                raise UserError("--cors-origin does not take wildcards; name each origin, e.g. http://localhost:3000")
            if not origin.startswith(("http://", "https://")) or origin.endswith("/"):
                raise UserError(f"--cors-origin {origin!r} must look like http://host[:port] (scheme, no path)")
        for name in self.allowed_hosts:
            if not name or "*" in name or "/" in name:
                raise UserError(f"--allowed-host {name!r} must be a plain host name or IP address (no port)")
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port must be between 0 and 65535, got {self.port}")

    def host_allowed(self, header: str | None) -> bool:
        """Whether a request's Host header names this server (DNS-rebinding guard)."""
        if not header:
            return False
        name = header.strip().lower()
        if name.startswith("["):  # [::1]:8000
            name = name[1:name.find("]")] if "]" in name else name
        elif name.count(":") == 1:  # host:port
            name = name.split(":")[0]
        name = name.rstrip(".")
        if is_loopback(name) or name in {h.lower().rstrip(".") for h in self.allowed_hosts}:
            return True
        # The address the server was bound to, when it is a specific IP (not 0.0.0.0 / ::).
        try:
            bound = ipaddress.ip_address(self.host.strip("[]"))
            return not bound.is_unspecified and ipaddress.ip_address(name) == bound
        except ValueError:
            return False
