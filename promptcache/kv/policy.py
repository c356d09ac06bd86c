"""Eviction bookkeeping: which cached entries to drop, against a byte budget, an idle TTL, pins and refcounts.

`LRUPolicy` holds no tensors; it tracks `key -> nbytes` for a store (module store, prefix tree) and answers
"what should go, in which order". The store does the actual freeing and then calls `remove`.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from promptcache.errors import StoreError

Key = Hashable


@dataclass
class _Entry:
    nbytes: int
    last_used: float
    pinned: bool = False
    refs: int = 0


class LRUPolicy:
    """Tracks entries (key -> nbytes) against a byte budget and picks eviction victims.

    Eviction order, as returned by `victims`:

    1. Expired entries first, least recently used first, regardless of the budget. An entry is expired
       when it has been idle (no `add`/`touch`) for more than `ttl_s` seconds (only when `ttl_s` is set).
    2. Then, least recently used first, until `used_bytes - freed + incoming_bytes <= budget_bytes`.

    Never chosen, in either step: pinned entries (`pin`) and in-use entries (`acquire` count > 0), so
    eviction never breaks a request in flight. `acquire` is not a use: call `touch` for that.

    An entry that cannot fit (e.g. larger than the whole budget) is not special-cased: `victims` then returns
    everything evictable and the caller decides whether to store it anyway; check `fits` after evicting.
    With `budget_bytes=None` there is no budget: only expired entries are victims.

    All public methods are thread-safe.

    Args:
        budget_bytes: the most bytes the entries may use, or None for no limit.
        ttl_s: idle seconds after which an entry expires, or None for never.
        clock: seconds source (injectable for tests); monotonic by default.
    """

    def __init__(self, budget_bytes: int | None, ttl_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if budget_bytes is not None and budget_bytes < 0:
            raise StoreError(f"budget_bytes must be >= 0 or None, got {budget_bytes!r}")
        if ttl_s is not None and ttl_s <= 0:
            raise StoreError(f"ttl_s must be > 0 or None, got {ttl_s!r}")
        self.budget_bytes = budget_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.RLock()
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()  # LRU first
        self._used = 0

    # -- bookkeeping -------------------------------------------------------------------------------

    def add(self, key: Key, nbytes: int) -> None:
        """Track `key` (or update its size); counts as a use. Pins and refcounts of a known key are kept."""
        if nbytes < 0:
            raise StoreError(f"nbytes must be >= 0, got {nbytes!r}")
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._entries[key] = _Entry(nbytes, self._clock())
            else:
                self._used -= entry.nbytes
                entry.nbytes = nbytes
            self._used += nbytes
            self.touch(key)

    def touch(self, key: Key) -> None:
        """Mark `key` as just used (most recently used, idle timer restarted)."""
        with self._lock:
            self._get(key).last_used = self._clock()
            self._entries.move_to_end(key)

    def remove(self, key: Key) -> bool:
        """Stop tracking `key` (even pinned or in use: caller decides). Returns whether it was known."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._used -= entry.nbytes
            return entry is not None

    def pin(self, key: Key) -> None:
        """Never evict `key` until `unpin`."""
        with self._lock:
            self._get(key).pinned = True

    def unpin(self, key: Key) -> None:
        with self._lock:
            self._get(key).pinned = False

    def acquire(self, key: Key) -> None:
        """Mark `key` in use (refcount + 1): it is never a victim until the matching `release`."""
        with self._lock:
            self._get(key).refs += 1

    def release(self, key: Key) -> None:
        """Undo one `acquire`."""
        with self._lock:
            entry = self._get(key)
            if entry.refs == 0:
                raise StoreError(f"release of {key!r} without a matching acquire")
            entry.refs -= 1

    # -- queries -----------------------------------------------------------------------------------

    def victims(self, incoming_bytes: int = 0) -> list[Key]:
        """Keys to evict, in order, so that `used_bytes + incoming_bytes <= budget_bytes` (see class docs)."""
        with self._lock:
            out = self.expired()
            if self.budget_bytes is None:
                return out
            chosen = set(out)
            excess = self.overflow(incoming_bytes) - sum(self._entries[k].nbytes for k in out)
            for key, entry in self._entries.items():
                if excess <= 0:
                    break
                if key not in chosen and self._evictable(entry):
                    out.append(key)
                    excess -= entry.nbytes
            return out

    def expired(self) -> list[Key]:
        """Evictable keys idle for more than `ttl_s`, least recently used first ([] without a TTL)."""
        with self._lock:
            if self.ttl_s is None:
                return []
            now = self._clock()
            return [k for k, e in self._entries.items()
                    if self._evictable(e) and now - e.last_used > self.ttl_s]

    def overflow(self, incoming_bytes: int = 0) -> int:
        """Bytes to free before `incoming_bytes` more fit the budget (0 when they fit, or with no budget)."""
        with self._lock:
            if self.budget_bytes is None:
                return 0
            return max(0, self._used + incoming_bytes - self.budget_bytes)

    def fits(self, incoming_bytes: int = 0) -> bool:
        """Whether `incoming_bytes` more stay within the budget right now."""
        return self.overflow(incoming_bytes) == 0

    def could_fit(self, incoming_bytes: int = 0) -> bool:
        """Whether `incoming_bytes` more would fit once every evictable entry were evicted."""
        with self._lock:
            return self.overflow(incoming_bytes) <= self.evictable_bytes()

    def evictable_bytes(self) -> int:
        """Bytes held by entries that are neither pinned nor in use."""
        with self._lock:
            return sum(e.nbytes for e in self._entries.values() if self._evictable(e))

    def in_use(self, key: Key) -> bool:
        with self._lock:
            return self._get(key).refs > 0

    def order(self) -> list[Key]:
        """All keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._used

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    # -- internals ---------------------------------------------------------------------------------

    def _get(self, key: Key) -> _Entry:
        try:
            return self._entries[key]
        except KeyError:
            raise StoreError(f"unknown cache entry {key!r}") from None

    @staticmethod
    def _evictable(entry: _Entry) -> bool:
        return not entry.pinned and entry.refs == 0
