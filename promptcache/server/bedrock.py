"""Amazon Bedrock's Converse API: `POST /model/{modelId}/converse` and `/model/{modelId}/converse-stream`.

Bodies: `system` and `messages` as content blocks (`{"text": ...}` and `{"cachePoint": {"type":
"default"}}`, a breakpoint after the blocks before it, kept 5 minutes, or `"ttl": "1h"`),
`inferenceConfig` (maxTokens, temperature, topP, stopSequences) and `additionalModelRequestFields`
(`top_k`, and promptcache's `cache_salt` and `recompute`). Usage: `inputTokens` (after the last cache
read or write), `outputTokens`, `totalTokens`, `cacheReadInputTokens`, `cacheWriteInputTokens`; they
sum as Anthropic's do. The stream uses AWS's binary event-stream framing (what boto3's
bedrock-runtime client parses): messageStart, contentBlockDelta..., contentBlockStop, messageStop,
metadata (usage, latency). Errors: `{"message"}` with the `x-amzn-ErrorType` header.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import Field
from starlette.responses import Response

from ..engine.keep import TTL_SECONDS, Breakpoint
from . import runner
from .errors import ApiError, as_api_error
from .jsonbody import SafeRoute
from .protocol import MAX_TOKENS_LIMIT, Body, GenerationRequest, NonEmpty, check_breakpoints, sampling_params
from .protocol import Sampling as OpenAISampling
from .service import Outcome, Service

logger = logging.getLogger(__name__)
router = APIRouter(route_class=SafeRoute)

_ERROR_TYPES = {400: "ValidationException", 401: "AccessDeniedException", 403: "AccessDeniedException",
                404: "ResourceNotFoundException", 408: "ModelTimeoutException", 413: "ValidationException",
                429: "ThrottlingException", 503: "ServiceUnavailableException"}


class CachePoint(Body):
    type: Literal["default"]
    ttl: Literal["5m", "1h"] = "5m"


class Block(Body):
    text: str | None = None
    cachePoint: CachePoint | None = None  # noqa: N815 - AWS's name


class Message(Body):
    role: Literal["user", "assistant"]
    content: list[Block] = Field(min_length=1)


class InferenceConfig(Body):
    maxTokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)  # noqa: N815
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    topP: float | None = Field(None, gt=0.0, le=1.0)  # noqa: N815
    stopSequences: list[NonEmpty] | None = Field(None, max_length=16)  # noqa: N815


class Extra(Body):
    top_k: int | None = Field(None, ge=0)
    cache_salt: str | None = Field(None, max_length=256)
    recompute: float | None = Field(None, ge=0.0, le=1.0)


class ConverseBody(Body):
    messages: list[Message] = Field(min_length=1)
    system: list[Block] | None = None
    inferenceConfig: InferenceConfig | None = None  # noqa: N815
    additionalModelRequestFields: Extra | None = None  # noqa: N815


@router.post("/model/{model_id}/converse", summary="Bedrock Converse (cachePoint blocks)")
async def converse(http: Request, model_id: str, body: ConverseBody) -> Response:
    from .app import service_of

    service = service_of(http)
    request = to_request(model_id, body, service.config.default_max_tokens)
    service.check_model(model_id)
    return await runner.complete(http, service, lambda c: answer(service, request, c))


@router.post("/model/{model_id}/converse-stream", summary="Bedrock ConverseStream (AWS event-stream framing)")
async def converse_stream(http: Request, model_id: str, body: ConverseBody) -> Response:
    from .app import service_of

    service = service_of(http)
    request = to_request(model_id, body, service.config.default_max_tokens)
    service.check_model(model_id)
    return await runner.stream(http, service, lambda c: events(service, request, c),
                               "application/vnd.amazon.eventstream")


def to_request(model_id: str, body: ConverseBody, default_max_tokens: int) -> GenerationRequest:
    config, extra = body.inferenceConfig or InferenceConfig(), body.additionalModelRequestFields or Extra()
    sampling = OpenAISampling(model=model_id, temperature=config.temperature, top_p=config.topP, top_k=extra.top_k,
                              stop=config.stopSequences)
    params = sampling_params(sampling, config.maxTokens or default_max_tokens, temperature=1.0)
    prompt, breakpoints = chat(body)
    return GenerationRequest("chat", model_id, prompt, params, False, False, extra.cache_salt or "",
                             extra.recompute, tuple(breakpoints))


def chat(body: ConverseBody) -> tuple[list[dict[str, str]], list[Breakpoint]]:
    """The messages (the system blocks first) and a breakpoint at each cachePoint."""
    turns = [("system", body.system)] if body.system else []
    turns += [(m.role, m.content) for m in body.messages]
    prompt, breakpoints = [], []
    for i, (role, blocks) in enumerate(turns):
        text = ""
        for j, block in enumerate(blocks):
            if (block.text is None) == (block.cachePoint is None):
                where = "system" if role == "system" else f"messages[{i - (1 if body.system else 0)}].content"
                raise ApiError(400, f"{where}[{j}]: a block holds exactly one of text or cachePoint "
                               "(images, documents and tools are not supported)", param=where)
            if block.text is not None:
                text += block.text
            else:
                breakpoints.append(Breakpoint(i, len(text), TTL_SECONDS[block.cachePoint.ttl]))
        prompt.append({"role": role, "content": text})
    check_breakpoints(breakpoints, "cachePoint")
    return prompt, breakpoints


def usage_body(outcome: Outcome) -> dict:
    cache = outcome.cache
    return {"inputTokens": cache.input_tokens, "outputTokens": outcome.usage.output_tokens,
            "totalTokens": cache.prompt_tokens + outcome.usage.output_tokens,
            "cacheReadInputTokens": cache.read_tokens, "cacheWriteInputTokens": cache.write_tokens}


def stop_reason(outcome: Outcome) -> str:
    if outcome.stop_sequence is not None:  # one of the request's stopSequences ended it
        return "stop_sequence"
    return "max_tokens" if outcome.finish_reason == "length" else "end_turn"


def answer(service: Service, request: GenerationRequest, cancelled: threading.Event) -> dict | None:
    t0 = time.perf_counter()
    done = service.complete(request, cancelled)
    if done is None:
        return None
    text, outcome = done
    return {"output": {"message": {"role": "assistant", "content": [{"text": text}]}},
            "stopReason": stop_reason(outcome), "usage": usage_body(outcome),
            "metrics": {"latencyMs": round((time.perf_counter() - t0) * 1000)}}


def events(service: Service, request: GenerationRequest, cancelled: threading.Event) -> Iterator[bytes]:
    """ConverseStream's events in AWS event-stream frames; the first only once the first token exists."""
    t0 = time.perf_counter()
    pieces = service.run(request, cancelled)
    try:
        first = next(pieces, None)
        if first is None:
            return
        yield frame("messageStart", {"role": "assistant"})
        try:
            for piece in runner_prepend(first, pieces):
                if isinstance(piece, Outcome):
                    yield frame("contentBlockStop", {"contentBlockIndex": 0})
                    yield frame("messageStop", {"stopReason": stop_reason(piece)})
                    yield frame("metadata", {"usage": usage_body(piece),
                                             "metrics": {"latencyMs": round((time.perf_counter() - t0) * 1000)}})
                else:
                    yield frame("contentBlockDelta", {"delta": {"text": piece}, "contentBlockIndex": 0})
        except Exception as e:  # noqa: BLE001 - the headers are out: an exception frame ends the stream
            error = as_api_error(e)
            if error.status == 500:
                logger.exception("internal error while streaming")
            name = "serviceUnavailableException" if error.status == 503 else "internalServerException"
            yield frame(name, {"message": error.message}, kind="exception")
    finally:
        pieces.close()


def runner_prepend(first, rest):
    yield first
    yield from rest


def frame(event: str, payload: dict, kind: str = "event") -> bytes:
    """One AWS event-stream message: prelude (total and header lengths, CRC32), headers, JSON payload, CRC32."""
    name_header = ":exception-type" if kind == "exception" else ":event-type"
    headers = b"".join(_header(k, v) for k, v in ((name_header, event), (":content-type", "application/json"),
                                                   (":message-type", kind)))
    body = json.dumps(payload, ensure_ascii=False).encode("utf-8", "replace")
    total = 12 + len(headers) + len(body) + 4
    prelude = struct.pack(">II", total, len(headers))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    message = prelude + headers + body
    return message + struct.pack(">I", zlib.crc32(message))


def _header(name: str, value: str) -> bytes:
    raw_name, raw_value = name.encode(), value.encode()
    return struct.pack(">B", len(raw_name)) + raw_name + struct.pack(">BH", 7, len(raw_value)) + raw_value


def error_type(status: int) -> str:
    return _ERROR_TYPES.get(status, "ValidationException" if status < 500 else "InternalServerException")


def error_body(error: ApiError) -> dict:
    return {"message": error.message}
