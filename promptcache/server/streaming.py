"""Between the engine and the socket: a request's blocking iterator in its own thread, a bounded
buffer, and the ASGI response that streams it.

    engine thread                    event loop
    service iterator --> buffer (N items) --> EventStream --> socket
         ^ blocks when full                     | stalls count against --stream-stall-s
         '-- closed when cancelled <------------'  client gone, stalled, shutting down

`EngineRun` runs the service's iterator (given the run's `cancelled` event; it waits for a run
slot, then calls `Engine.stream`) in a thread, so the event loop never blocks; at most `buffer`
items wait for the client. Cancelling it (`cancel()`) makes the thread close the iterator at its
next item, which stops generation and frees the request's cache. `EventStream` sends the items; a
client that does not take them (its socket stays unwritable) for `stall_s` seconds in total is
dropped, which frees its run slot: a stream nobody reads cannot hold a slot for longer than that.
A disconnect is noticed while waiting for the next item, not only when writing.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from starlette.responses import Response

logger = logging.getLogger(__name__)


class ClientGone(Exception):
    """The client closed its connection, or stopped reading for too long; the request was stopped."""


class EngineRun:
    """`start()`'s iterator, run in its own thread, its items handed over through a bounded buffer.

    Create it on the event loop; iterate with `await next_item(...)`; always `cancel()` at the end
    (harmless once finished).
    """

    def __init__(self, start: Callable[[threading.Event], Iterator[Any]], buffer: int):
        self.cancelled = threading.Event()
        self._loop = asyncio.get_running_loop()
        self._items: asyncio.Queue = asyncio.Queue()
        self._room = threading.Semaphore(buffer)
        self._thread = threading.Thread(target=self._produce, args=(start,), daemon=True,
                                        name="promptcache-request")
        self._thread.start()

    def cancel(self) -> None:
        self.cancelled.set()

    async def next_item(self, gone: asyncio.Future | None = None) -> Any:
        """The next item; StopAsyncIteration at the end; the iterator's exception; ClientGone when `gone`
        (a watcher of the client's disconnect) finishes first."""
        get = asyncio.ensure_future(self._items.get())
        if gone is not None:
            await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                raise ClientGone()
        kind, value = await get
        if kind == "item":
            self._room.release()
            return value
        if kind == "end":
            raise StopAsyncIteration
        raise value

    def _produce(self, start: Callable[[threading.Event], Iterator[Any]]) -> None:
        try:
            items = start(self.cancelled)
            try:
                for item in items:
                    while not self._room.acquire(timeout=0.1):
                        if self.cancelled.is_set():
                            return
                    if self.cancelled.is_set():
                        return
                    self._put(("item", item))
            finally:
                items.close()  # stops generation and frees the cache when it did not finish
            self._put(("end", None))
        except BaseException as e:  # noqa: BLE001 - handed to the event loop, which answers it
            self._put(("error", e))

    def _put(self, message: tuple[str, Any]) -> None:
        try:
            self._loop.call_soon_threadsafe(self._items.put_nowait, message)
        except RuntimeError:  # the loop is closed: the server has stopped
            pass


async def disconnected(receive) -> None:
    """Returns once the client has disconnected (the request body is already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStream(Response):
    """An ASGI response streaming an `EngineRun`'s byte items after a `first` one.

    Args:
        run: the request's run (cancelled when the stream ends, however it ends).
        first: the first item, already taken (errors before it are plain error answers).
        media_type: the response's content type.
        stall_s: total seconds the client may leave the socket unwritable before it is dropped.
        on_gone: called once when the client went away or was dropped.
    """

    def __init__(self, run: EngineRun, first: bytes, media_type: str, stall_s: float,
                 on_gone: Callable[[], None] = lambda: None, headers: dict[str, str] | None = None):
        self.run, self.first, self.media_type, self.stall_left = run, first, media_type, stall_s
        self.on_gone, self.extra_headers = on_gone, headers or {}
        self.status_code, self.background = 200, None

    async def __call__(self, scope, receive, send) -> None:
        gone = asyncio.ensure_future(disconnected(receive))
        headers = [(b"content-type", self.media_type.encode()), (b"cache-control", b"no-cache"),
                   *((k.lower().encode(), v.encode()) for k, v in self.extra_headers.items())]
        try:
            await self._send(send, {"type": "http.response.start", "status": 200, "headers": headers})
            item = self.first
            while True:
                await self._send(send, {"type": "http.response.body", "body": item, "more_body": True})
                try:
                    item = await self.run.next_item(gone)
                except StopAsyncIteration:
                    break
            await self._send(send, {"type": "http.response.body", "body": b"", "more_body": False})
        except (ClientGone, OSError):
            self.on_gone()
            await _abort(scope)
        except Exception:  # noqa: BLE001 - the API formatters answer errors in-band; this is a bug
            logger.exception("internal error while streaming")
            await _abort(scope)
        finally:
            self.run.cancel()
            gone.cancel()

    async def _send(self, send, message: dict) -> None:
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(send(message), timeout=max(self.stall_left, 0.001))
        except asyncio.TimeoutError:
            logger.info("dropping a stream whose client stopped reading (stalled over the limit)")
            raise ClientGone() from None
        self.stall_left -= time.monotonic() - t0


async def _abort(scope) -> None:
    """Drop the connection now (buffered bytes and all)."""
    abort = scope.get("extensions", {}).get("promptcache.abort")
    if abort is not None:
        abort()
        await asyncio.sleep(0)  # let the server see the connection lost
