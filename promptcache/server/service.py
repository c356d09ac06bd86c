"""`Service`: what each endpoint does, over the engine's public API, without any HTTP.

The HTTP layer (`server.http`) decodes a request, calls one method here and writes what it
returns; errors come out as `ApiError`s (or the library's `PromptCacheError`s, which it answers
with 400). Generation always runs through `engine.stream` under a run slot of the `Gate`, so that
a client that goes away stops its generation and frees its request cache: the stream is closed,
which the engine turns into releasing the cache. A streamed request notices through its writes
(the HTTP layer closes it when one fails); a non-streamed one, which writes nothing until the end,
polls `gone` between tokens.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ..engine.usage import Chunk
from .config import ServerConfig
from .errors import ApiError
from .gate import Busy, Gate
from .metrics import Metrics
from .protocol import GenerationRequest, Kind, parse_request
from .responses import ResponseShape, model_body, schema_body

logger = logging.getLogger(__name__)


class ClientGone(Exception):
    """The client closed its connection; the request was stopped."""


class Service:
    """The endpoints' logic.

    Args:
        engine: a loaded `Engine` (schemas may already be added).
        config: the server's settings.
    """

    def __init__(self, engine, config: ServerConfig):
        self.engine, self.config = engine, config
        self.gate = Gate(config.parallel, config.max_queue)
        self.metrics = Metrics()
        self.started = int(time.time())
        self.aborting = threading.Event()  # set when the shutdown grace period is over

    # ---- models ---------------------------------------------------------------------------

    def models(self) -> dict:
        return {"object": "list", "data": [model_body(self.config.model_name, self.started)]}

    def model(self, model_id: str) -> dict:
        self.check_model(model_id)
        return model_body(model_id, self.started)

    def check_model(self, model_id: str) -> None:
        if model_id != self.config.model_name:
            raise ApiError(404, f"The model '{model_id}' does not exist; this server serves "
                           f"'{self.config.model_name}'", param="model", code="model_not_found")

    # ---- schemas --------------------------------------------------------------------------

    def add_schema(self, text: str) -> dict:
        """Add (or replace) a schema from its PML text; encodes its modules under a run slot."""
        # NOTE: add_schema reads a str that does not start with "<" as a path: never let a body be one
        if not text.lstrip("\ufeff \t\r\n").startswith("<"):
            raise ApiError(400, "the body must be a PML <schema> document (XML text starting with '<')",
                           param="body")
        with self._admit():
            layout = self.engine.add_schema(text, base_dir=self.config.schema_base_dir)
        return schema_body(layout)

    def schemas(self) -> dict:
        return {"object": "list", "data": [schema_body(layout) for _, layout in sorted(self.engine.schemas.items())]}

    def schema(self, name: str) -> dict:
        return schema_body(self._layout(name))

    def delete_schema(self, name: str) -> dict:
        self._layout(name)
        self.engine.remove_schema(name)
        return {"id": name, "object": "schema", "deleted": True}

    def _layout(self, name: str):
        layout = self.engine.schemas.get(name)
        if layout is None:
            added = ", ".join(sorted(self.engine.schemas)) or "(none)"
            raise ApiError(404, f"unknown schema '{name}'; added schemas: {added}", code="schema_not_found")
        return layout

    # ---- generation -----------------------------------------------------------------------

    def parse(self, body, kind: Kind) -> GenerationRequest:
        request = parse_request(body, kind, self.config.default_max_tokens)
        self.check_model(request.model)
        return request

    def complete(self, request: GenerationRequest, gone: Callable[[], bool]) -> dict:
        """Generate the whole answer; raises ClientGone (and stops) if `gone()` turns true."""
        shape = ResponseShape(request.kind, request.model)
        texts = []
        chunks = self._chunks(request, gone)
        try:
            for chunk in chunks:
                texts.append(chunk.text)
                if chunk.usage is not None:
                    return shape.completion("".join(texts), chunk.finish_reason, chunk.usage)
        finally:
            chunks.close()
        raise AssertionError("a stream always ends with a usage chunk")  # pragma: no cover

    def stream(self, request: GenerationRequest) -> Iterator[dict]:
        """The answer as OpenAI stream chunks. The first is produced only once the first token is
        (so that a bad prompt is still a plain 400); closing the iterator stops generation."""
        shape = ResponseShape(request.kind, request.model)
        usage = request.include_usage
        chunks = self._chunks(request)
        try:
            first = next(chunks)
            if request.kind == "chat":
                yield shape.chunk("", role=True, include_usage=usage)
            for chunk in _prepend(first, chunks):
                if chunk.text:
                    yield shape.chunk(chunk.text, include_usage=usage)
                if chunk.usage is not None:
                    yield shape.chunk(None, chunk.finish_reason, include_usage=usage)
                    if usage:
                        yield shape.usage_chunk(chunk.usage)
        finally:
            chunks.close()

    def _chunks(self, request: GenerationRequest, gone: Callable[[], bool] | None = None) -> Iterator[Chunk]:
        """`engine.stream` under a run slot; the engine's stream is closed on any exit."""
        with self._admit() as queued_s:
            chunks = self.engine.stream(request.prompt, request.params, enable_cache=self.config.enable_cache,
                                        namespace=request.namespace, recompute=request.recompute)
            try:
                for chunk in chunks:
                    if gone is not None and gone():
                        self.metrics.cancelled()
                        raise ClientGone()
                    if self.aborting.is_set():
                        raise ApiError(503, "the server is shutting down; the request was stopped")
                    if chunk.usage is not None:
                        self.metrics.completed(chunk.usage, queued_s)
                    yield chunk
            finally:
                chunks.close()

    @contextmanager
    def _admit(self) -> Iterator[float]:
        """A run slot (yields the seconds queued); a full gate is a 503."""
        try:
            with self.gate.slot() as queued_s:
                yield queued_s
        except Busy as e:  # only the gate raises it, when admitting
            raise ApiError(503, str(e), code="server_busy") from None

    # ---- health and metrics ---------------------------------------------------------------

    def health(self) -> dict:
        prefix = self.engine.prefix
        return {
            "status": "shutting_down" if self.gate.closed else "ok",
            "model": self.config.model_name,
            "requests": {"running": self.gate.running, "queued": self.gate.waiting,
                         "parallel": self.gate.parallel, "max_queue": self.gate.max_queue},
            "cache": {"enabled": self.config.enable_cache, "schemas": sorted(self.engine.schemas),
                      "store": self.engine.store.stats(),
                      "prefix_bytes": prefix.nbytes if prefix is not None else 0,
                      "pool_idle_bytes": self.engine.pool.idle_bytes},
        }

    def metrics_text(self) -> str:
        stats, prefix = self.engine.store.stats(), self.engine.prefix
        gauges = {
            "requests_running": ("Requests generating now.", {(): self.gate.running}),
            "requests_queued": ("Requests waiting for a run slot.", {(): self.gate.waiting}),
            "store_bytes": ("Bytes of module states in each memory tier.",
                            {(("tier", t),): stats[f"{t}_bytes"] for t in ("device", "host")}),
            "store_modules": ("Modules whose states are in each memory tier.",
                              {(("tier", t),): stats[f"{t}_modules"] for t in ("device", "host")}),
            "prefix_cache_bytes": ("Bytes of cached prompt prefixes (plain prompts, chats, PML prompts "
                                   "recomputed in full).",
                                   {(): prefix.nbytes if prefix is not None else 0}),
            "request_cache_idle_bytes": ("Bytes of idle request caches kept for reuse.",
                                         {(): self.engine.pool.idle_bytes}),
            "schemas": ("Schemas added.", {(): len(self.engine.schemas)}),
        }
        return self.metrics.render(gauges)


def _prepend(first: Chunk, rest: Iterator[Chunk]) -> Iterator[Chunk]:
    yield first
    yield from rest
