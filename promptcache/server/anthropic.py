"""Anthropic's Messages API: `POST /v1/messages` and `POST /v1/messages/count_tokens`.

Bodies: `system` (a string or text blocks), `messages` (user/assistant, a string or text blocks),
`max_tokens` (required), `stop_sequences`, `stream`, `temperature` (default 1), `top_p`, `top_k`
(the 2.x client sends these three through `extra_body`: they are plain body fields either way),
`metadata` (ignored), and prompt caching: `cache_control` {"type": "ephemeral", "ttl": "5m" | "1h"}
on system and message blocks, at most 4, or once at the top level (a breakpoint after the last
block). promptcache's own fields: `cache_salt` (the tenant) and `recompute`, as on the OpenAI routes.

Usage, truthful and summing to the prompt's tokens: `cache_read_input_tokens` (read from the cache,
breakpoints or not), `cache_creation_input_tokens` (kept by this request's breakpoints, split by TTL
in `cache_creation`), `input_tokens` (the rest: after the last read or write). A stream is
Anthropic's event sequence: message_start, content_block_start, ping, content_block_delta...,
content_block_stop, message_delta (stop_reason and the usage), message_stop; an error after the
first event is an `error` event. Errors: `{"type": "error", "error": {"type", "message"}}`.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Iterator
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import Field
from starlette.responses import Response

from ..engine.keep import TTL_SECONDS, Breakpoint
from . import runner
from .errors import ApiError, as_api_error, bad_field
from .jsonbody import SafeRoute
from .protocol import MAX_TOKENS_LIMIT, Body, CacheControl, GenerationRequest, NonEmpty, check_breakpoints
from .protocol import Sampling as OpenAISampling
from .service import Outcome, Service

logger = logging.getLogger(__name__)
router = APIRouter(route_class=SafeRoute)

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                503: "overloaded_error"}


class TextBlock(Body):
    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None


class Message(Body):
    role: Literal["user", "assistant"]
    content: str | list[TextBlock]


class CountTokensBody(Body):
    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    cache_salt: str | None = Field(None, max_length=256)


class MessagesBody(CountTokensBody):
    max_tokens: int = Field(ge=1, le=MAX_TOKENS_LIMIT)
    stop_sequences: list[NonEmpty] | None = Field(None, max_length=16)
    stream: bool | None = None
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    cache_control: CacheControl | None = None
    recompute: float | None = Field(None, ge=0.0, le=1.0)


@router.post("/v1/messages", summary="Anthropic Messages (prompt caching with cache_control)")
async def messages(http: Request, body: MessagesBody) -> Response:
    from .app import service_of

    service = service_of(http)
    request = to_request(body)
    service.check_model(request.model)
    if request.stream:
        return await runner.stream(http, service, lambda c: events(service, request, c),
                                   "text/event-stream; charset=utf-8")
    return await runner.complete(http, service, lambda c: answer(service, request, c))


@router.post("/v1/messages/count_tokens", summary="The prompt's token count, as /v1/messages would see it")
async def count_tokens(http: Request, body: CountTokensBody) -> dict:
    from .app import service_of

    service = service_of(http)
    service.check_model(body.model)
    prompt, _ = chat(body)
    plan = await run_in_threadpool(service.engine.plan, prompt, namespace=body.cache_salt or "")
    return {"input_tokens": len(plan.token_ids)}


def to_request(body: MessagesBody) -> GenerationRequest:
    from .protocol import sampling_params

    _unsupported(body.model_extra or {})
    prompt, breakpoints = chat(body)
    if body.cache_control is not None:
        breakpoints.append(Breakpoint(len(prompt) - 1, len(prompt[-1]["content"]), TTL_SECONDS[body.cache_control.ttl]))
    check_breakpoints(breakpoints, "cache_control")
    sampling = OpenAISampling(model=body.model, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                              stop=body.stop_sequences)
    params = sampling_params(sampling, body.max_tokens, temperature=1.0)
    return GenerationRequest("chat", body.model, prompt, params, bool(body.stream), False, body.cache_salt or "",
                             body.recompute, tuple(breakpoints))


def chat(body: CountTokensBody) -> tuple[list[dict[str, str]], list[Breakpoint]]:
    """The messages (the system prompt first) and a breakpoint after each block with `cache_control`."""
    blocks = [("system", body.system)] if body.system is not None else []
    blocks += [(m.role, m.content) for m in body.messages]
    prompt, breakpoints = [], []
    for i, (role, content) in enumerate(blocks):
        if isinstance(content, str):
            prompt.append({"role": role, "content": content})
            continue
        text = ""
        for block in content:
            text += block.text
            if block.cache_control is not None:
                breakpoints.append(Breakpoint(i, len(text), TTL_SECONDS[block.cache_control.ttl]))
        prompt.append({"role": role, "content": text})
    return prompt, breakpoints


def _unsupported(extra: dict) -> None:
    for name, hint in (("tools", "tool use is not supported"), ("tool_choice", "tool use is not supported"),
                       ("thinking", "extended thinking is not supported")):
        if extra.get(name) not in (None, [], {}):
            raise bad_field(name, hint)


# ---- responses ------------------------------------------------------------------------------


def usage_body(outcome: Outcome) -> dict:
    cache = outcome.cache
    return {"input_tokens": cache.input_tokens, "output_tokens": outcome.usage.output_tokens,
            "cache_creation_input_tokens": cache.write_tokens, "cache_read_input_tokens": cache.read_tokens,
            "cache_creation": {"ephemeral_5m_input_tokens": cache.written.get(TTL_SECONDS["5m"], 0),
                               "ephemeral_1h_input_tokens": cache.written.get(TTL_SECONDS["1h"], 0)}}


def stop_reason(outcome: Outcome) -> str:
    if outcome.stop_sequence is not None:  # one of the request's stop_sequences ended it
        return "stop_sequence"
    return "max_tokens" if outcome.finish_reason == "length" else "end_turn"


def message_body(msg_id: str, model: str, text: str, outcome: Outcome | None) -> dict:
    return {"id": msg_id, "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}] if outcome is not None else [],
            "stop_reason": stop_reason(outcome) if outcome is not None else None,
            "stop_sequence": outcome.stop_sequence if outcome is not None else None,
            "usage": usage_body(outcome) if outcome is not None else
            {"input_tokens": 0, "output_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}


def answer(service: Service, request: GenerationRequest, cancelled: threading.Event) -> dict | None:
    done = service.complete(request, cancelled)
    if done is None:
        return None
    text, outcome = done
    return message_body("msg_" + uuid.uuid4().hex, request.model, text, outcome)


def events(service: Service, request: GenerationRequest, cancelled: threading.Event) -> Iterator[bytes]:
    """Anthropic's event sequence; the first event only once the first token exists."""
    msg_id = "msg_" + uuid.uuid4().hex
    pieces = service.run(request, cancelled)
    try:
        first = next(pieces, None)
        if first is None:
            return
        yield _event("message_start", {"type": "message_start",
                                       "message": message_body(msg_id, request.model, "", None)})
        yield _event("content_block_start", {"type": "content_block_start", "index": 0,
                                             "content_block": {"type": "text", "text": ""}})
        yield _event("ping", {"type": "ping"})
        try:
            for piece in runner_prepend(first, pieces):
                if isinstance(piece, Outcome):
                    yield _event("content_block_stop", {"type": "content_block_stop", "index": 0})
                    yield _event("message_delta", {"type": "message_delta",
                                                   "delta": {"stop_reason": stop_reason(piece),
                                                             "stop_sequence": piece.stop_sequence},
                                                   "usage": usage_body(piece)})
                    yield _event("message_stop", {"type": "message_stop"})
                else:
                    yield _event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                         "delta": {"type": "text_delta", "text": piece}})
        except Exception as e:  # noqa: BLE001 - the headers are out: an error event ends the stream
            error = as_api_error(e)
            if error.status == 500:
                logger.exception("internal error while streaming")
            yield _event("error", error_body(error))
    finally:
        pieces.close()


def runner_prepend(first, rest):
    yield first
    yield from rest


def _event(name: str, body: dict) -> bytes:
    return f"event: {name}\ndata: ".encode() + json.dumps(body, ensure_ascii=False).encode("utf-8", "replace") + b"\n\n"


def error_body(error: ApiError) -> dict:
    return {"type": "error", "error": {"type": _ERROR_TYPES.get(error.status, "invalid_request_error" if
                                                                error.status < 500 else "api_error"),
                                       "message": error.message}}
