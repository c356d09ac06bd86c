"""The HTTP layer: a FastAPI app over the `Service`, served by uvicorn (`main.py`).

    POST /v1/chat/completions  POST /v1/completions     OpenAI          (openai_api.py)
    POST /v1/messages  POST /v1/messages/count_tokens   Anthropic       (anthropic.py)
    POST /model/{id}/converse  /converse-stream         Bedrock         (bedrock.py)
    GET/POST /v1/schemas  GET/DELETE /v1/schemas/{name}  GET /v1/models[/{id}]
    /v1/cache/...  warm, list, pin, evict               (cache_api.py)
    GET /health  GET /metrics  GET /docs (OpenAPI)

`Guard`, a plain ASGI middleware, runs first on every request: it answers 503 "loading" until the
model is ready (`/health` and `/docs` excepted), checks the API key (`Authorization: Bearer` or
`x-api-key`; `/health` says only "alive" without it), refuses a body over `max_body_bytes` (413)
before reading it, gives the body `body_timeout_s` to arrive (408), and counts requests by endpoint
and status. JSON bodies are parsed by `jsonbody.parse_json` (limits on depth and digits) through
`jsonbody.SafeRoute`, every router's route class; a bad body or field is a 400 naming it, in the
envelope of the API that was called.
"""

from __future__ import annotations

import asyncio
import hmac
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from ..errors import PromptCacheError
from . import anthropic, bedrock
from .config import ServerConfig
from .errors import ApiError, as_api_error
from .jsonbody import validation_error

logger = logging.getLogger(__name__)

OPEN_PATHS = ("/health", "/docs", "/openapi.json")


class Startup:
    """The server before and after the model is ready: `progress` while loading, then the `service`."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.service = None
        self.progress = "starting"
        self.failed: str | None = None


def create_app(startup: Startup) -> FastAPI:
    from . import cache_api, openai_api, routes

    app = FastAPI(title="promptcache", summary="Modular prompt caching over OpenAI, Anthropic and Bedrock APIs",
                  docs_url="/docs", redoc_url=None)
    app.state.startup = startup
    for module in (routes, openai_api, anthropic, bedrock, cache_api):
        app.include_router(module.router)
    app.add_exception_handler(RequestValidationError, _invalid)
    # NOTE: Exception's handler runs in starlette's outermost middleware, which logs a traceback
    # afterwards: every error a client can cause has its own class here
    for kind in (Exception, ApiError, HTTPException, PromptCacheError):
        app.add_exception_handler(kind, _error)
    app.add_middleware(Guard, startup=startup)
    return app


def service_of(request: Request):
    """The ready `Service` (`Guard` answers 503 before it exists)."""
    return request.app.state.startup.service


def error_response(path: str, error: ApiError) -> Response:
    """`error` in the envelope of the API at `path`."""
    headers = dict(error.headers or {})
    if error.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if path.startswith("/v1/messages"):
        return JSONResponse(anthropic.error_body(error), error.status, headers)
    if path.startswith("/model/"):
        headers["x-amzn-ErrorType"] = bedrock.error_type(error.status)
        return JSONResponse(bedrock.error_body(error), error.status, headers)
    return JSONResponse(error.body(), error.status, headers)


async def _invalid(request: Request, exc: RequestValidationError) -> Response:
    return error_response(request.url.path, validation_error(exc.errors()))


async def _error(request: Request, exc: Exception) -> Response:
    error = as_api_error(exc)
    if type(exc) is HTTPException and exc.status_code in (404, 405):  # starlette's routing
        error = _routing_error(request, exc)
    if error.status == 500:
        logger.error("internal error on %s %s: %r", request.method, request.url.path, exc, exc_info=exc)
    return error_response(request.url.path, error)


def _routing_error(request: Request, exc: HTTPException) -> ApiError:
    path = request.url.path
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        return ApiError(405, f"{request.method} is not allowed on {path}; use {allowed}")
    paths = sorted({getattr(r, "path", "") for r in request.app.routes} - {"", "/docs/oauth2-redirect"})
    return ApiError(404, f"no endpoint {path!r:.80}; endpoints: {', '.join(paths)}", code="unknown_url")


class Guard:
    """Loading, auth, body limits and request counts, before any route (see the module docstring)."""

    def __init__(self, app, startup: Startup):
        self.app, self.startup = app, startup

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, config = scope["path"], self.startup.config
        status = [0]

        async def counted_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            error = self._refusal(scope, path, config)
            if error is not None:
                await error_response(path, error)(scope, receive, counted_send)
            else:
                await self.app(scope, _limited(receive, config), counted_send)
        finally:
            service = self.startup.service
            if service is not None and status[0]:
                route = scope.get("route")
                service.metrics.request(getattr(route, "path", "other"), status[0])

    def _refusal(self, scope, path: str, config: ServerConfig) -> ApiError | None:
        if path in OPEN_PATHS:
            return None
        if not authorized(scope, config.api_key):
            return ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
                            code="invalid_api_key")
        if self.startup.service is None:
            return loading_error(self.startup)
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
            return ApiError(413, f"the body is {int(length)} bytes; the limit is {config.max_body_bytes} bytes",
                            code="request_too_large")
        return None


def loading_error(startup: Startup) -> ApiError:
    if startup.failed is not None:
        return ApiError(503, f"the server failed to start: {startup.failed}", code="startup_failed")
    return ApiError(503, f"the server is loading ({startup.progress}); retry shortly", code="loading",
                    headers={"Retry-After": "2"})


def authorized(scope, key: str | None) -> bool:
    if key is None:
        return True
    scheme, _, token = (_header(scope, b"authorization") or "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode()):
        return True
    given = _header(scope, b"x-api-key")
    return given is not None and hmac.compare_digest(given.strip().encode(), key.encode())


def _header(scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _limited(receive, config: ServerConfig):
    """`receive` with the body's limits: `max_body_bytes` (chunked bodies too) within `body_timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline, seen, done = loop.time() + config.body_timeout_s, [0], [False]

    async def limited() -> dict:
        if done[0]:
            return await receive()
        try:
            message = await asyncio.wait_for(receive(), timeout=max(deadline - loop.time(), 0.001))
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {config.body_timeout_s:g} s") from None
        if message["type"] == "http.request":
            seen[0] += len(message.get("body", b""))
            if seen[0] > config.max_body_bytes:
                raise ApiError(413, f"the body is over the limit of {config.max_body_bytes} bytes",
                               code="request_too_large")
            done[0] = not message.get("more_body", False)
        return message

    return limited
