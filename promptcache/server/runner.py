"""One request's run from a route: the engine work in its own thread, raced against the client.

Every generating route ends in `stream` or `complete`: parse (pydantic) -> one of these -> format.
`stream` waits for the first event before answering (a bad prompt is still a plain error answer),
then hands the run to an `EventStream`. `complete` waits for the whole answer; a client that
disconnects meanwhile (or half-closes and then really closes, see `connection.py`) cancels it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import Request
from starlette.responses import JSONResponse, Response

from .streaming import ClientGone, EngineRun, EventStream, disconnected


async def stream(http: Request, service, events: Callable[[threading.Event], Iterator[bytes]],
                 media_type: str, headers: dict[str, str] | None = None) -> Response:
    """An `EventStream` of `events(cancelled)`, once its first event exists."""
    run = EngineRun(events, service.config.stream_buffer)
    gone = asyncio.ensure_future(disconnected(http.receive))
    try:
        first = await run.next_item(gone)
    except ClientGone:
        run.cancel()
        service.metrics.cancelled()
        return Response(status_code=499)
    except BaseException:
        run.cancel()
        raise
    finally:
        gone.cancel()
    return EventStream(run, first, media_type, service.config.stream_stall_s, on_gone=service.metrics.cancelled,
                       headers=headers)


async def complete(http: Request, service, answer: Callable[[threading.Event], Any],
                   headers: dict[str, str] | None = None) -> Response:
    """The JSON body `answer(cancelled)` returns (None: cancelled)."""
    run = EngineRun(lambda cancelled: iter([answer(cancelled)]), 1)
    gone = asyncio.ensure_future(disconnected(http.receive))
    try:
        body = await run.next_item(gone)
    except ClientGone:
        service.metrics.cancelled()
        return Response(status_code=499)
    finally:
        run.cancel()
        gone.cancel()
    return JSONResponse(body, headers=headers)
