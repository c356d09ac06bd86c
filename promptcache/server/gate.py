"""`Gate`: admission control. At most `parallel` requests run, at most `max_queue` wait, more get 503.

Each request runs in its own thread; the gate is what bounds the model work. A request that finds
every run slot taken and the queue full is refused at once (`Busy`) instead of piling up threads and
memory; a request admitted to the queue waits for a slot in arrival order, and leaves the queue when
its client goes away (`cancelled`). Once the server starts shutting down (`close()`), nothing new is
admitted and `wait_idle` lets the requests already running finish.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager


class Busy(Exception):
    """No run slot and no room in the queue, or the server is shutting down."""


class Abandoned(Exception):
    """The request was cancelled while it waited for a slot."""


class Gate:
    """Bounds concurrent requests.

    Args:
        parallel: requests that may run at once (>= 1).
        max_queue: requests that may wait for a slot (>= 0).
    """

    def __init__(self, parallel: int, max_queue: int):
        if parallel < 1 or max_queue < 0:
            raise ValueError(f"parallel must be >= 1 and max_queue >= 0, got {parallel}, {max_queue}")
        self.parallel, self.max_queue = parallel, max_queue
        self._cond = threading.Condition()
        self._running = 0
        self._queue: deque[object] = deque()  # waiters, in arrival order
        self._closed = False

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def closed(self) -> bool:
        return self._closed

    @contextmanager
    def slot(self, cancelled: threading.Event | None = None) -> Iterator[float]:
        """Hold a run slot for the block; yields the seconds spent queued. Raises Busy when full,
        Abandoned when `cancelled` is set while waiting."""
        t0 = time.perf_counter()
        me = object()
        with self._cond:
            if self._closed:
                raise Busy("the server is shutting down")
            if self._running + len(self._queue) >= self.parallel + self.max_queue:
                raise Busy(f"the server is busy: {self._running} requests running and {len(self._queue)} "
                           f"queued (limits {self.parallel} and {self.max_queue}); retry later")
            self._queue.append(me)
            try:
                while not self._cond.wait_for(lambda: self._queue[0] is me and self._running < self.parallel,
                                              timeout=None if cancelled is None else 0.1):
                    if cancelled.is_set():
                        raise Abandoned()
            finally:
                self._queue.remove(me)
                self._cond.notify_all()
            self._running += 1
        try:
            yield time.perf_counter() - t0
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    def close(self) -> None:
        """Admit nothing more (requests already queued still run)."""
        with self._cond:
            self._closed = True

    def wait_idle(self, timeout: float | None) -> bool:
        """Wait until nothing runs or waits; False if `timeout` seconds passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._running == 0 and not self._queue, timeout)
