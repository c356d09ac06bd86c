"""Prefills in turns: a request's prefill runs a chunk at a time, when the scheduler gives it a turn.

A prefill has four ways to fill a cache (`Engine.prefill`: a full prefill, a prefix, modules, a
selective recompute), each of which runs its new tokens through `prefill.run_chunks`. The scheduler
must interleave those chunks with the decode steps of running requests, so that a long uncached
prompt does not stall every stream. Rather than turn each of the four ways inside out, a prefill
runs in a thread of its own that only ever runs while the scheduler waits for it:

    scheduler thread   turn(64) ........wait........  decode step  turn(64) ..wait..  decode step
    prefill thread     splice, 64 prompt tokens | paused ............ 64 more | paused ........

`PrefillTurns.run(n)` lets the prefill run chunks of `n` prompt tokens in all and returns once it
paused before its next chunk, or ended. Outside a turn-taking thread (a plain
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
    case what is left of its turn (after waiting for the next turn when nothing is)."""
    turns: PrefillTurns | None = getattr(_LOCAL, "turns", None)
    return default if turns is None else turns.take(default)


class PrefillTurns:
    """Runs `fn` (a prefill) in its own thread, a budget of prompt tokens per `run` call.

    Attributes:
        spent: prompt tokens the last turn ran.
        result: what `fn` returned, once `done` and no `error`.
        error: what `fn` raised, if it did.
    """

    def __init__(self, fn: Callable[[], object], name: str = "promptcache-prefill"):
        self._fn = fn
        self._go, self._paused = threading.Semaphore(0), threading.Semaphore(0)
        self._left, self._cancelled = 0, False
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self.spent = 0
        self.result: object = None
        self.error: BaseException | None = None
        self.done = False

    def run(self, tokens: int) -> bool:
        """Let the prefill run chunks of at most `tokens` prompt tokens in all, then pause before its next
        chunk; True once it ended (`spent` says how many tokens the turn ran)."""
        if self.done:
            return True
        self._left, self.spent = tokens, 0
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

    def take(self, want: int) -> int:
        """In the prefill's thread, before a chunk of up to `want` tokens: the tokens it may run now,
        after pausing until the next turn when this turn's are spent."""
        if self._left <= 0:
            self._paused.release()
            self._go.acquire()
            if self._cancelled:
                raise RequestCancelled()
        n = min(want, self._left)
        self._left -= n
        self.spent += n
        return n

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
