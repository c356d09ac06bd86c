"""An OpenAI-compatible HTTP server over one `Engine` (`promptcache serve`).

    config.py     ServerConfig: the operator's settings
    protocol.py   request bodies checked into GenerationRequest (400s naming the field)
    responses.py  OpenAI-shaped completions, stream chunks, usage (with a `promptcache` object)
    gate.py       admission: bounded parallel requests, a bounded queue, 503 beyond
    service.py    what each endpoint does, over the engine's public API (no HTTP)
    metrics.py    counters and a TTFT histogram, Prometheus text
    http.py       the stdlib threaded HTTP server: routing, auth, body limits, SSE, disconnects
    main.py       the `serve` command: load, add schemas, serve, shut down on SIGTERM/SIGINT

Built on the standard library's `http.server` (no web framework): the engine is synchronous and
thread-safe, so a thread per connection runs its request directly, and the thread that streams is
the one that notices a departed client and closes the generation.
"""

from __future__ import annotations

import importlib

# NOTE: imported on first use, so that `promptcache validate` (whose parser knows `serve`'s
# options) never imports torch.
_LAZY = {"ApiError": ".errors", "Server": ".http", "ServerConfig": ".config", "Service": ".service"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'promptcache.server' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


__all__ = ["ApiError", "Server", "ServerConfig", "Service"]
