"""The HTTP layer: a threaded stdlib server, routing, auth, body limits, JSON and server-sent events.

One thread per connection (HTTP/1.1 keep-alive), at most `max_connections` of them; the `Gate`
bounds how many generate at once. A connection's thread owns its generation: when a streamed
write to a departed client fails, or (not streaming) the socket reads as closed between tokens,
the thread closes the engine's stream, which stops generation and frees the request's cache.

    POST /v1/chat/completions    POST /v1/completions    GET /v1/models[/{id}]
    POST /v1/schemas (PML body)  GET /v1/schemas[/{name}]  DELETE /v1/schemas/{name}
    GET /health (no key needed)  GET /metrics (Prometheus text)
"""

from __future__ import annotations

import hmac
import json
import logging
import select
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

from .errors import ApiError, as_api_error
from .service import ClientGone, Service

logger = logging.getLogger(__name__)

DRAIN_MAX_BYTES = 64 << 20  # after a 413, read and drop at most this much so the client sees the answer
_JSON = "application/json"


class Server(ThreadingHTTPServer):
    """A `ThreadingHTTPServer` holding the `Service`, with a cap on open connections."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, service: Service):
        self.service = service
        config = service.config
        self.address_family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        self._connections = threading.BoundedSemaphore(config.max_connections)
        super().__init__((config.host, config.port), Handler)

    def process_request(self, request, client_address):
        if not self._connections.acquire(blocking=False):
            _refuse(request, 503, "too many open connections; retry later")
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connections.release()

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], OSError):  # a client that reset or stalled its connection
            logger.debug("connection from %s dropped", client_address, exc_info=True)
        else:
            logger.exception("unhandled error serving %s", client_address)


class Handler(BaseHTTPRequestHandler):
    """One connection's requests."""

    protocol_version = "HTTP/1.1"
    server_version = "promptcache"
    sys_version = ""

    def setup(self):
        self.timeout = self.server.service.config.io_timeout_s
        super().setup()

    @property
    def service(self) -> Service:
        return self.server.service

    def do_GET(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_DELETE(self):
        self._dispatch()

    # ---- dispatch -------------------------------------------------------------------------

    def _dispatch(self) -> None:
        path = urlsplit(self.path).path.rstrip("/") or "/"
        self._endpoint, self._unread = "other", _content_length(self.headers)
        try:
            if path != "/health":
                self._authorize()
            self._endpoint, action, arg = _match(self.command, path)
            action(self, arg)
        except ClientGone:
            self.close_connection = True
        except OSError:  # the client went away or stalled while we wrote or read
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - every error is answered; a bug is logged, never shown
            error = as_api_error(e)
            if error.status == 500:
                logger.exception("internal error on %s %s", self.command, path)
            try:
                self._send_error(error)
            except OSError:  # the client is gone: nobody to tell
                self.close_connection = True
        finally:
            if self._unread != 0:  # a body we did not read would be parsed as the next request
                self.close_connection = True
                self._drain(self._unread)

    def _authorize(self) -> None:
        key = self.service.config.api_key
        if key is None:
            return
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    # ---- endpoints ------------------------------------------------------------------------

    def _health(self, _) -> None:
        self._send_json(200, self.service.health())

    def _metrics(self, _) -> None:
        self._send(200, self.service.metrics_text().encode(), "text/plain; version=0.0.4; charset=utf-8")

    def _models(self, _) -> None:
        self._send_json(200, self.service.models())

    def _model(self, model_id: str) -> None:
        self._send_json(200, self.service.model(model_id))

    def _schemas(self, _) -> None:
        self._send_json(200, self.service.schemas())

    def _add_schema(self, _) -> None:
        self._send_json(200, self.service.add_schema(self._read_text()))

    def _schema(self, name: str) -> None:
        self._send_json(200, self.service.schema(name))

    def _delete_schema(self, name: str) -> None:
        self._send_json(200, self.service.delete_schema(name))

    def _chat(self, _) -> None:
        self._generate("chat")

    def _completion(self, _) -> None:
        self._generate("completion")

    # ---- generation -----------------------------------------------------------------------

    def _generate(self, kind: str) -> None:
        request = self.service.parse(self._read_json(), kind)
        if not request.stream:
            return self._send_json(200, self.service.complete(request, self._client_gone))
        events = self.service.stream(request)  # a departed client makes a write fail
        try:
            first = next(events)  # the first token exists: errors before this point are plain answers
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.service.metrics.request(self._endpoint, 200)
            self._write_event(first)
            self._stream_rest(events)
        except OSError:  # a write failed: the client is gone
            self.service.metrics.cancelled()
            raise ClientGone() from None
        finally:
            events.close()  # stops generation and frees the cache if it did not finish

    def _stream_rest(self, events) -> None:
        try:
            for event in events:
                self._write_event(event)
        except (OSError, ClientGone):
            raise
        except Exception as e:  # noqa: BLE001 - the headers are out: report in-band, then end the stream
            error = as_api_error(e)
            if error.status == 500:
                logger.exception("internal error while streaming")
            self._write_event(error.body())
        self._write_chunk(b"data: [DONE]\n\n")
        self._write_chunk(b"")

    def _write_event(self, event: dict) -> None:
        self._write_chunk(b"data: " + json.dumps(event, ensure_ascii=False).encode("utf-8", "replace") + b"\n\n")

    def _write_chunk(self, data: bytes) -> None:
        """One chunk of a chunked body (empty: the terminating chunk)."""
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _client_gone(self) -> bool:
        """True when the client closed its connection (readable, and a peek reads nothing)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    # ---- bodies ---------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() not in ("", "identity"):
            raise ApiError(411, "send the body with a Content-Length (chunked request bodies are not accepted)")
        n = self._unread
        if n is None:
            raise ApiError(411, "a Content-Length header (a non-negative integer) is required")
        limit = self.service.config.max_body_bytes
        if n > limit:
            raise ApiError(413, f"the body is {n} bytes; the limit is {limit} bytes", code="request_too_large")
        self._unread = 0
        return self.rfile.read(n)

    def _drain(self, n: int | None) -> None:
        """Read and drop a body we will not use (bounded), so that the client reads our answer."""
        self._unread = 0
        try:
            left = min(n or 0, DRAIN_MAX_BYTES)  # unknown length (chunked): just close
            while left > 0 and (got := self.rfile.read(min(left, 1 << 16))):
                left -= len(got)
        except OSError:
            pass

    def _read_json(self):
        raw = self._read_body()
        try:
            return json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ApiError(400, f"the body is not UTF-8 (byte {e.start})", param="body") from None
        except json.JSONDecodeError as e:
            raise ApiError(400, f"the body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                           param="body", code="invalid_json") from None

    def _read_text(self) -> str:
        try:
            return self._read_body().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ApiError(400, f"the body is not UTF-8 (byte {e.start})", param="body") from None

    # ---- answers --------------------------------------------------------------------------

    def _send_json(self, status: int, body: dict) -> None:
        self._send(status, json.dumps(body, ensure_ascii=False).encode("utf-8", "replace"), _JSON)

    def _send(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if self._unread != 0 or self.close_connection:
            self.close_connection = True
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.service.metrics.request(self._endpoint, status)

    def _send_error(self, error: ApiError) -> None:
        if error.status >= 500 and error.status != 503:
            self.close_connection = True
        extra = {"WWW-Authenticate": "Bearer"} if error.status == 401 else {}
        self._extra_headers = extra
        self._send_json(error.status, error.body())

    def end_headers(self):
        for name, value in getattr(self, "_extra_headers", {}).items():
            self.send_header(name, value)
        self._extra_headers = {}
        super().end_headers()

    def send_error(self, code, message=None, explain=None):
        """Malformed HTTP (bad request line, headers too long, unknown method): the JSON envelope too."""
        self.close_connection = True
        self._endpoint, self._unread = "other", 0
        try:
            self._send_json(code, ApiError.status_only(code, message).body())
        except OSError:
            pass

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        logger.debug("%s - %s", self.address_string(), format % args)


_ROUTES = {
    "/health": {"GET": Handler._health},
    "/metrics": {"GET": Handler._metrics},
    "/v1/models": {"GET": Handler._models},
    "/v1/models/{id}": {"GET": Handler._model},
    "/v1/chat/completions": {"POST": Handler._chat},
    "/v1/completions": {"POST": Handler._completion},
    "/v1/schemas": {"GET": Handler._schemas, "POST": Handler._add_schema},
    "/v1/schemas/{name}": {"GET": Handler._schema, "DELETE": Handler._delete_schema},
}


def _match(method: str, path: str):
    """(route, handler method, path argument); 404 for an unknown path, 405 for a wrong method."""
    route, arg = path, None
    for prefix, template in (("/v1/models/", "/v1/models/{id}"), ("/v1/schemas/", "/v1/schemas/{name}")):
        if path.startswith(prefix):
            route, arg = template, unquote(path[len(prefix):])
    methods = _ROUTES.get(route)
    if methods is None:
        raise ApiError(404, f"no endpoint {path!r:.80}; endpoints: {', '.join(_ROUTES)}", code="unknown_url")
    if method not in methods:
        raise ApiError(405, f"{method} is not allowed on {route}; use {' or '.join(methods)}")
    return route, methods[method], arg


def _content_length(headers) -> int | None:
    """The declared body length: 0 without a body, None when unknown (malformed or chunked)."""
    if headers.get("Transfer-Encoding", "").lower() not in ("", "identity"):
        return None
    value = headers.get("Content-Length")
    if value is None:
        return 0
    try:
        n = int(value)
    except ValueError:
        return None
    return n if n >= 0 else None


def _refuse(sock: socket.socket, status: int, message: str) -> None:
    """Answer a connection that is not served (no thread for it) with one small error response."""
    body = json.dumps(ApiError(status, message).body()).encode()
    head = (f"HTTP/1.1 {status} Service Unavailable\r\nContent-Type: {_JSON}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    try:
        sock.settimeout(1.0)
        sock.sendall(head + body)
    except OSError:
        pass
