"""uvicorn's HTTP/1.1 protocol, hardened against clients that hold connections without using them.

- Header deadline: a request's headers must arrive within `header_timeout_s` of the connection
  opening (or of the previous response on a kept-alive connection), however slowly they trickle;
  then the connection is closed. (uvicorn's keep-alive timer restarts on every byte.)
- Connection cap: at most `max_connections` open. A new connection over the cap closes the oldest
  connection that is not in a request (still sending headers, or idle between requests); when every
  connection is in a request, the new one is answered 503 and closed. Idle sockets therefore never
  keep a working client out.
- Half-close is not a disconnect: a client that shuts down its sending side after the request still
  gets its answer. While a request without a started response runs, the connection is probed with an
  interim `100 Continue` (which HTTP/1.1 clients skip) every `PROBE_S`: a peer that really closed
  answers with a reset, and the request is cancelled as for any disconnect.
- Bounded send buffers: the kernel's is fixed at `SEND_BUFFER_BYTES` (no autotuning to megabytes),
  so that a client that stops reading makes the server's writes wait soon (see `streaming.py`).
- `scope["extensions"]["promptcache.abort"]` drops the connection at once (a stream nobody reads).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import threading
import time
from dataclasses import dataclass

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)

PROBE_S = 1.0
SEND_BUFFER_BYTES = 64 << 10  # the kernel's share of what a client that stops reading leaves buffered


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float
    max_connections: int


class GuardedH11Protocol(H11Protocol):
    """One connection (see the module docstring); `limits` are the operator's flags."""

    def __init__(self, *args, limits: ConnectionLimits, **kwargs):
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.idle_since = time.monotonic()
        self._header_timer: asyncio.TimerHandle | None = None
        self._probe_timer: asyncio.TimerHandle | None = None

    @property
    def in_request(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections and not self._shed_idle():
            self.transport = transport
            _refuse(transport, "too many open connections, all of them in a request; retry later")
            return
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:  # NOTE: a fixed kernel buffer: autotuning would let a non-reader absorb megabytes
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        if self.conn is not None and hasattr(self, "flow"):
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        was_in_request = self.in_request
        super().data_received(data)
        if self.in_request and not was_in_request:
            self._started_request()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.in_request:  # a pipelined request was waiting
            self._started_request()
        elif not self.transport.is_closing():
            self.idle_since = time.monotonic()
            self._arm_header_deadline()

    def eof_received(self) -> bool | None:
        if not self.in_request:
            return None  # nothing more will come: close
        if not self.cycle.response_started and self.scope.get("http_version") == "1.1":
            self._probe_timer = self.loop.call_later(PROBE_S, self._probe)
        return True  # half-close: keep writing

    def send_400_response(self, msg: str) -> None:
        """Malformed HTTP (a bad request line, headers over the size limit): the JSON envelope too."""
        body = _envelope(f"malformed HTTP request: {msg}", "invalid_request_error", "malformed_http")
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        self.transport.close()

    # ---- helpers --------------------------------------------------------------------------

    def _started_request(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self.cycle.scope.setdefault("extensions", {})["promptcache.abort"] = self.transport.abort

    def _arm_header_deadline(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._header_deadline)

    def _header_deadline(self) -> None:
        self._header_timer = None
        if not self.in_request and not self.transport.is_closing():
            logger.debug("closing a connection whose request headers took over %.0f s",
                         self.limits.header_timeout_s)
            self.transport.abort()

    def _probe(self) -> None:
        self._probe_timer = None
        if self.in_request and not self.cycle.response_started and not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self._probe_timer = self.loop.call_later(PROBE_S, self._probe)

    def _shed_idle(self) -> bool:
        """Close the connection idle the longest (not in a request); False when there is none."""
        idle = [c for c in self.connections if isinstance(c, GuardedH11Protocol) and not c.in_request
                and not c.transport.is_closing()]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c.idle_since)
        logger.debug("connection cap reached: closing an idle connection")
        oldest.transport.abort()
        self.connections.discard(oldest)
        return True

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._probe_timer):
            if timer is not None:
                timer.cancel()


def _envelope(message: str, kind: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()


def _refuse(transport: asyncio.Transport, message: str) -> None:
    body = _envelope(message, "server_overloaded", "too_many_connections")
    transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
    transport.close()



class DrainingServer(uvicorn.Server):
    """uvicorn's server with the serve command's signals: the first SIGTERM/SIGINT drains (new requests get
    503, running ones finish within the grace period), a second stops running requests; no signal is
    raised again at exit, so a drained server exits 0.

    Args:
        config: uvicorn's config.
        startup: the app's `Startup` (its service, once loaded, owns the gate).
    """

    def __init__(self, config: uvicorn.Config, startup):
        super().__init__(config)
        self.app_startup = startup

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig, frame) -> None:
        service = self.app_startup.service
        if self.should_exit:
            self.force_exit = True
            if service is not None:
                service.aborting.set()  # a second signal: stop running requests now
            return
        logger.info("%s: shutting down", signal.Signals(sig).name)
        if service is not None:
            service.gate.close()
        self.should_exit = True
