"""LRUPolicy: the documented eviction order, asserted exactly."""

from __future__ import annotations

import pytest

from promptcache.errors import StoreError
from promptcache.kv.policy import LRUPolicy

from .helpers import run_threads


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_victims_exact_order_lru_pin_acquire():
    p = LRUPolicy(budget_bytes=100)
    for key in "abcde":
        p.add(key, 20)  # order a b c d e, used 100
    p.touch("a")  # b c d e a
    p.pin("b")
    p.acquire("c")
    assert p.order() == ["b", "c", "d", "e", "a"]
    assert p.victims() == []
    assert p.victims(incoming_bytes=1) == ["d"]
    assert p.victims(incoming_bytes=30) == ["d", "e"]
    # Everything evictable, pinned b and in-use c never:
    assert p.victims(incoming_bytes=1000) == ["d", "e", "a"]
    p.release("c")
    assert p.victims(incoming_bytes=50) == ["c", "d", "e"]
    p.unpin("b")
    assert p.victims(incoming_bytes=50) == ["b", "c", "d"]


def test_expired_first_regardless_of_budget():
    clock = FakeClock()
    p = LRUPolicy(budget_bytes=1000, ttl_s=10, clock=clock)
    p.add("old", 10)
    p.add("pinned_old", 10)
    p.pin("pinned_old")
    p.add("busy_old", 10)
    p.acquire("busy_old")
    clock.now = 5
    p.add("fresh", 10)
    p.add("touched", 10)
    clock.now = 8
    p.touch("old")  # restarts its idle timer
    clock.now = 12  # idle: old 4, pinned_old/busy_old 12, fresh/touched 7
    assert p.expired() == []
    clock.now = 16  # idle: old 8, fresh/touched 11
    assert p.expired() == ["fresh", "touched"]
    assert p.victims() == ["fresh", "touched"]  # well within budget, still evicted
    clock.now = 19
    assert p.victims(incoming_bytes=0) == ["fresh", "touched", "old"]


def test_expired_then_lru_until_within_budget():
    clock = FakeClock()
    p = LRUPolicy(budget_bytes=30, ttl_s=10, clock=clock)
    p.add("a", 10)
    clock.now = 20
    p.add("b", 10)
    p.add("c", 10)
    clock.now = 25
    p.touch("a")  # a is now fresh
    p.add("x", 10)  # used 40; order b c a x; nothing expired yet (idle b, c: 5)
    assert p.victims() == ["b"]
    clock.now = 31  # b, c idle 11 > 10 -> expired; a, x fresh
    assert p.victims() == ["b", "c"]
    assert p.victims(incoming_bytes=15) == ["b", "c", "a"]


def test_no_budget_only_expired_and_oversized_entry():
    assert LRUPolicy(None).victims(10**12) == []
    p = LRUPolicy(budget_bytes=50)
    p.add("a", 10)
    p.add("b", 10)
    p.pin("a")
    # An entry larger than the whole budget: everything evictable, the caller decides.
    assert p.victims(incoming_bytes=80) == ["b"]
    assert not p.fits(80)
    p.remove("b")
    assert not p.fits(80) and p.fits(40)


def test_overflow_fits_and_could_fit():
    p = LRUPolicy(budget_bytes=100)
    p.add("a", 60)
    p.add("b", 30)
    p.pin("a")
    assert (p.overflow(), p.fits(), p.overflow(10), p.fits(10)) == (0, True, 0, True)
    assert (p.overflow(11), p.fits(11)) == (1, False)
    assert p.could_fit(40) and not p.could_fit(41)  # only b's 30 bytes can be evicted
    unbounded = LRUPolicy(None)
    unbounded.add("a", 10)
    assert (unbounded.overflow(10**12), unbounded.fits(10**12), unbounded.could_fit(10**12)) == (0, True, True)


def test_bookkeeping():
    p = LRUPolicy(budget_bytes=100)
    p.add("a", 10)
    p.add("b", 5)
    assert p.used_bytes == 15 and len(p) == 2 and "a" in p and "z" not in p
    p.add("a", 30)  # resize, counts as a use
    assert p.used_bytes == 35 and p.order() == ["b", "a"]
    p.acquire("a")
    p.acquire("a")
    p.release("a")
    assert p.in_use("a")
    p.release("a")
    assert not p.in_use("a")
    assert p.evictable_bytes() == 35
    assert p.remove("a") and not p.remove("a")
    assert p.used_bytes == 5 and p.order() == ["b"]


@pytest.mark.parametrize("call", [
    lambda p: p.touch("missing"),
    lambda p: p.pin("missing"),
    lambda p: p.acquire("missing"),
    lambda p: p.release("a"),  # never acquired
    lambda p: p.add("b", -1),
])
def test_misuse_raises_store_error(call):
    p = LRUPolicy(budget_bytes=10)
    p.add("a", 1)
    with pytest.raises(StoreError):
        call(p)


@pytest.mark.parametrize("kwargs", [{"budget_bytes": -1}, {"budget_bytes": 1, "ttl_s": 0}])
def test_bad_config(kwargs):
    with pytest.raises(StoreError):
        LRUPolicy(**kwargs)


def test_thread_safety_smoke():
    p = LRUPolicy(budget_bytes=10**9)

    def work(t: int) -> None:
        for i in range(500):
            key = (t, i % 50)
            p.add(key, 1)
            p.acquire(key)
            p.touch(key)
            p.release(key)
            p.victims(10)
            if i % 3 == 0:
                p.remove(key)

    run_threads(work)
    assert p.used_bytes == len(p)
