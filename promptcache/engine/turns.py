"""Prefills in turns: a request's prefill runs a chunk at a time, when the scheduler gives it a turn.

A prefill has four ways to fill a cache (`Engine.prefill`: a full prefill, a prefix, modules, a
selective recompute), each of which runs its new tokens through `prefill.run_chunks`. The scheduler
must interleave those chunks with the decode steps of running requests, so that a long uncached
prompt does not stall every stream. Rather than turn each of the four ways inside out, a prefill
runs in a thread of its own that only ever runs while the scheduler waits for it:

    scheduler thread   turn(64) ........wait........  decode step  turn(64) ..wait..  decode step
    prefill thread     splice, chunk 1 (64 tokens) | paused ......... chunk 2 | paused ........

`PrefillTurns.run(n)` lets the prefill go on until it reaches its next chunk (of at most `n`
tokens) and returns once it paused there again or ended. Outside a turn-taking thread (a plain
`Engine.prefill` call) `chunk_size` is just the default chunk, and nothing waits.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

_LOCAL = threading.local()


class RequestCancelled(Exception):
    """Raised inside a paused prefill whose request was cancelled, to unwind it."""


def chunk_size(default: int) -> int:
    """Tokens the next prefill chunk may run: `default` unless this thread takes turns, in which
    case it first waits for its turn (`PrefillTurns.run`)."""
    turns: PrefillTurns | None = getattr(_LOCAL, "turns", None)
    return default if turns is None else min(default, turns.wait())


class PrefillTurns:
    """Runs `fn` (a prefill) in its own thread, a chunk per `run` call.

    Attributes:
        result: what `fn` returned, once `done` and no `error`.
        error: what `fn` raised, if it did.
    """

    def __init__(self, fn: Callable[[], object], name: str = "promptcache-prefill"):
        self._fn = fn
        self._go, self._paused = threading.Semaphore(0), threading.Semaphore(0)
        self._size, self._cancelled, self._first = 0, False, True
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self.result: object = None
        self.error: BaseException | None = None
        self.done = False

    def run(self, tokens: int) -> bool:
        """Let the prefill run until its next chunk of at most `tokens` tokens is done; True once it ended."""
        if self.done:
            return True
        self._size = tokens
        if not self._thread.is_alive() and not self._cancelled:
            self._thread.start()
        else:
            self._go.release()
        self._paused.acquire()
        return self.done

    def cancel(self) -> None:
        """Unwind a started prefill (its thread raises `RequestCancelled` where it paused); idempotent."""
        if self.done:
            return
        self._cancelled = True
        if self._thread.is_alive():
            self._go.release()
            self._paused.acquire()
        else:
            self.done = True

    def wait(self) -> int:
        """In the prefill's thread, before a chunk: pause until the next turn (not before the first chunk,
        which runs in the turn that started the prefill); the chunk's token count."""
        if self._first:
            self._first = False
            return self._size
        self._paused.release()
        self._go.acquire()
        if self._cancelled:
            raise RequestCancelled()
        return self._size

    def _main(self) -> None:
        _LOCAL.turns = self
        try:
            self.result = self._fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the scheduler, which fails the request
            self.error = exc
        finally:
            _LOCAL.turns = None
            self.done = True
            self._paused.release()
