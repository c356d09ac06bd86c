"""Helpers shared by the kv tests."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def run_threads(work: Callable[[int], object], n: int = 8) -> None:
    """Run work(0..n-1) in n threads at once; re-raise the first exception any of them raised."""
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            work(i)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]


def finishes(call: Callable[[], T], timeout_s: float = 20.0) -> T:
    """call() run in a daemon thread; fails the test if it has not returned after `timeout_s` (a hang)."""
    result: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(call())
        except BaseException as e:  # surfaced below
            errors.append(e)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(timeout_s)
    assert not th.is_alive(), f"still blocked after {timeout_s} s"
    if errors:
        raise errors[0]
    return result[0]


@contextlib.contextmanager
def fifo_released(path: Path) -> Iterator[None]:
    """On exit, open the FIFO at `path` (if one) for writing: a reader a regression left stuck in open() returns."""
    try:
        yield
    finally:
        if path.is_fifo():
            with contextlib.suppress(OSError):  # ENXIO: no reader waiting, as it should be
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
