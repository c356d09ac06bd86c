"""`Service`: what each endpoint does, over the engine's public API, without any HTTP.

The one place that talks to the engine. Every API (OpenAI, Anthropic, Bedrock) maps its body to a
`GenerationRequest` and formats what `run` yields: text deltas, then one `Outcome` (finish reason,
the engine's usage, and the prompt split into cache reads, writes and input). `run` waits for a run
slot of the `Gate`, calls `Engine.stream`, and closes it on any exit: a client that goes away (the
`cancelled` event, set by the HTTP layer) stops its generation at the next token and frees its
request cache. A request with breakpoints (`cache_control`, `cachePoint`) then keeps its states up
to each for the breakpoint's TTL (`Engine.keep_prefix`). It runs in a worker thread; nothing here
touches the event loop. Errors are `ApiError`s (or the library's `PromptCacheError`s: 400s).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ..engine.keep import CacheReport, cache_report
from ..engine.usage import Usage
from ..errors import PromptCacheError
from .caching import CacheAdmin
from .config import ServerConfig
from .errors import ApiError
from .gate import Abandoned, Busy, Gate
from .metrics import Metrics
from .protocol import GenerationRequest
from .responses import model_body, schema_body

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """How a generation ended: `finish_reason` ("stop" or "length"), the engine's `usage`, the `cache` split."""

    finish_reason: str
    usage: Usage
    cache: CacheReport
    stop_sequence: str | None = None


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
        self.cache_admin = CacheAdmin(self)

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
        with self.admit():
            try:
                layout = self.engine.add_schema(text, base_dir=self.config.schema_base_dir)
            except PromptCacheError as e:
                if self.config.schema_base_dir is None and "base_dir=" in str(e):
                    raise ApiError(400, str(e).replace("pass base_dir= to allow reading files",
                                                       "the server reads no src= files unless started with "
                                                       "--schema-base-dir DIR")) from None
                raise
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

    def run(self, request: GenerationRequest, cancelled: threading.Event) -> Iterator[str | Outcome]:
        """Text deltas, then an `Outcome`; stops (closing the engine's stream) once `cancelled` is set."""
        self.check_model(request.model)
        try:
            with self.admit(cancelled) as queued_s:
                yield from self._generate(request, cancelled, queued_s)
        except Abandoned:  # the client left while queued
            return

    def _generate(self, request: GenerationRequest, cancelled: threading.Event, queued_s: float,
                  ) -> Iterator[str | Outcome]:
        chunks = self.engine.stream(request.prompt, request.params, enable_cache=self.config.enable_cache,
                                    namespace=request.namespace, recompute=request.recompute)
        try:
            for chunk in chunks:
                if cancelled.is_set():
                    return
                if self.aborting.is_set():
                    raise ApiError(503, "the server is shutting down; the request was stopped")
                if chunk.text:
                    yield chunk.text
                if chunk.usage is not None:
                    self.metrics.completed(chunk.usage, queued_s)
                    asked = chunk.stop_sequence if chunk.stop_sequence in request.params.stop else None
                    yield Outcome(chunk.finish_reason, chunk.usage, self._keep(request, chunk.usage), asked)
        finally:
            chunks.close()

    def complete(self, request: GenerationRequest, cancelled: threading.Event) -> tuple[str, Outcome] | None:
        """The whole answer and its outcome; None when cancelled."""
        texts, outcome = [], None
        for piece in self.run(request, cancelled):
            if isinstance(piece, Outcome):
                outcome = piece
            else:
                texts.append(piece)
        return None if outcome is None else ("".join(texts), outcome)

    def _keep(self, request: GenerationRequest, usage: Usage) -> CacheReport:
        """Keep the chat's states up to its breakpoints (if any); the prompt's reads, writes and input."""
        kept = []
        if request.breakpoints and request.kind == "chat" and self.config.enable_cache:
            kept = self.engine.keep_prefix(request.prompt, request.breakpoints, request.namespace)
        return cache_report(usage.input_tokens, usage.cached_tokens, kept)

    @contextmanager
    def admit(self, cancelled: threading.Event | None = None) -> Iterator[float]:
        """A run slot (yields the seconds queued); a full gate is a 503."""
        try:
            with self.gate.slot(cancelled) as queued_s:
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
