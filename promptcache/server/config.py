"""`ServerConfig`: what the operator chose for one server (the `promptcache serve` options)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServerConfig:
    """Server settings.

    Attributes:
        model_name: the model id clients name (`GET /v1/models`); others get 404.
        host / port: where to listen (port 0: any free port, announced on stdout).
        api_key: when set, every endpoint but `/health` needs `Authorization: Bearer <key>`.
        parallel: requests generating at once; more wait in the queue.
        max_queue: requests waiting for a slot; more are refused with 503.
        max_body_bytes: largest request body; more is refused with 413 before it is read.
        default_max_tokens: tokens generated when a request names no max_tokens.
        enable_cache: False prefills every prompt token (the baseline; `--no-cache`).
        schema_base_dir: the directory `src=` files of schemas posted over HTTP may come from
            (None: posted schemas cannot read server files at all).
        shutdown_grace_s: on SIGTERM/SIGINT, how long running requests may take to finish.
        header_timeout_s: a request's headers must arrive within this many seconds (of the connection
            opening or the previous response), or the connection is closed.
        body_timeout_s: a request's body must arrive within this many seconds of its headers (else 408).
        keep_alive_s: an idle kept-alive connection is closed after this many seconds.
        max_connections: open connections; over it, the oldest idle one is closed, or the new one gets 503.
        stream_buffer: events buffered between the engine and a streaming client.
        stream_stall_s: total seconds a streaming client may leave its socket unwritable before it is
            dropped (its generation stopped, its run slot freed).
    """

    model_name: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    parallel: int = 16
    max_queue: int = 64
    max_body_bytes: int = 16 << 20
    default_max_tokens: int = 256
    enable_cache: bool = True
    schema_base_dir: Path | None = None
    shutdown_grace_s: float = 30.0
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keep_alive_s: float = 5.0
    max_connections: int = 256
    stream_buffer: int = 64
    stream_stall_s: float = 30.0


def default_store_dir() -> Path:
    """Where `serve` persists module states unless `--store-dir` or `--no-store`: modules/ in the cache directory."""
    from ..models.convert import default_store_dir as under_cache

    return under_cache()
