"""OpenAI's `/v1/chat/completions` and `/v1/completions`: bodies in `protocol.py`, shapes in `responses.py`.

A stream is server-sent events `data: {chunk}` ending with `data: [DONE]`; an error after the first
event is sent in-band as `data: {"error": ...}`, then the stream ends.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator

from fastapi import APIRouter, Request
from starlette.responses import Response

from . import runner
from .app import service_of
from .errors import as_api_error
from .jsonbody import SafeRoute
from .protocol import ChatBody, CompletionBody, GenerationRequest, to_request
from .responses import ResponseShape
from .service import Outcome, Service

logger = logging.getLogger(__name__)
router = APIRouter(route_class=SafeRoute)


@router.post("/v1/chat/completions", summary="OpenAI chat completions (automatic prefix reuse, cache_control)")
async def chat_completions(request: Request, body: ChatBody) -> Response:
    return await generate(request, body)


@router.post("/v1/completions", summary="OpenAI completions: plain text or a PML <prompt>")
async def completions(request: Request, body: CompletionBody) -> Response:
    return await generate(request, body)


async def generate(http: Request, body: ChatBody | CompletionBody) -> Response:
    service = service_of(http)
    request = to_request(body, service.config.default_max_tokens)
    service.check_model(request.model)
    if request.stream:
        return await runner.stream(http, service, lambda c: events(service, request, c),
                                   "text/event-stream; charset=utf-8")
    return await runner.complete(http, service, lambda c: answer(service, request, c))


def answer(service: Service, request: GenerationRequest, cancelled: threading.Event) -> dict | None:
    done = service.complete(request, cancelled)
    if done is None:
        return None
    text, outcome = done
    shape = ResponseShape(request.kind, request.model)
    return shape.completion(text, outcome.finish_reason, outcome.usage, outcome.cache)


def events(service: Service, request: GenerationRequest, cancelled: threading.Event) -> Iterator[bytes]:
    """The answer as SSE chunks; the first only once the first token exists (errors before it are plain)."""
    shape = ResponseShape(request.kind, request.model)
    usage = request.include_usage
    pieces = service.run(request, cancelled)
    try:
        first = next(pieces, None)
        if first is None:
            return
        if request.kind == "chat":
            yield _event(shape.chunk("", role=True, include_usage=usage))
        try:
            for piece in _prepend(first, pieces):
                if isinstance(piece, Outcome):
                    yield _event(shape.chunk(None, piece.finish_reason, include_usage=usage))
                    if usage:
                        yield _event(shape.usage_chunk(piece.usage, piece.cache))
                else:
                    yield _event(shape.chunk(piece, include_usage=usage))
        except Exception as e:  # noqa: BLE001 - the headers are out: report in-band, then end the stream
            error = as_api_error(e)
            if error.status == 500:
                logger.exception("internal error while streaming")
            yield _event(error.body())
        yield b"data: [DONE]\n\n"
    finally:
        pieces.close()


def _event(body: dict) -> bytes:
    return b"data: " + json.dumps(body, ensure_ascii=False).encode("utf-8", "replace") + b"\n\n"


def _prepend(first, rest):
    yield first
    yield from rest
