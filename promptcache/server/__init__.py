"""The HTTP server over one `Engine` (`promptcache serve`): OpenAI, Anthropic and Bedrock APIs.

    config.py      ServerConfig: the operator's settings
    protocol.py    OpenAI bodies (pydantic) and GenerationRequest, the one internal request
    anthropic.py   Anthropic Messages: bodies, events, usage, errors
    bedrock.py     Bedrock Converse: bodies, AWS event-stream frames, usage, errors
    responses.py   OpenAI-shaped completions, stream chunks, usage (with a `promptcache` object)
    service.py     what each endpoint does, over the engine's public API (no HTTP)
    gate.py        admission: bounded parallel requests, a bounded queue, 503 beyond
    metrics.py     counters and a TTFT histogram, Prometheus text
    app.py         the FastAPI app: loading, auth, body limits, error envelopes
    jsonbody.py    JSON within limits, pydantic errors as 400s naming the field
    streaming.py   the engine's iterator in a thread, a bounded buffer, the streamed response
    runner.py      a request's run raced against its client's disconnect
    connection.py  uvicorn's HTTP/1.1 protocol with header deadlines, a connection cap, half-close
    main.py        the `serve` command: check schemas, listen, load, serve, drain on SIGTERM

FastAPI, uvicorn and pydantic come with `pip install "promptcache[server]"`; the library does not
need them, and `promptcache validate` (whose parser knows `serve`'s options) imports none of them.
"""

from __future__ import annotations

import importlib

# NOTE: imported on first use, so that the CLI's parser never imports torch or FastAPI.
_LAZY = {"ApiError": ".errors", "ServerConfig": ".config", "Service": ".service", "create_app": ".app"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'promptcache.server' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


__all__ = ["ApiError", "ServerConfig", "Service", "create_app"]
