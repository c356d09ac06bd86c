"""Kept prefixes: the states of a chat up to given breakpoints, held in the prefix tree for a TTL.

This is what Anthropic's `cache_control` and Bedrock's `cachePoint` ask for. A request names
breakpoints (after message i's first `chars` characters, kept `ttl_s` seconds); once it has run (its
prompt's states are then in the prefix tree), `Engine.keep_prefix` turns each breakpoint into a token
offset and holds the tree's nodes up to it: held nodes are never evicted, by bytes or idle time,
until their TTL ends; keeping the same prefix again (a hit) restarts its TTL. A pinned prefix
(`ttl_s` None) stays until unpinned or evicted by hand.

    tokens  |<------------- prompt ------------------------------------->|
            |== read (cached at start) ==|-- written --|-- input -------|
                                         ^             ^ last breakpoint held
    read + written + input == prompt tokens; written is split by the TTL of the breakpoint it ends at.

`CacheReport` is that split, counted from what the tree really holds: a breakpoint whose states could
not be kept (no prefix cache, a full budget) writes nothing and its tokens count as input.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..errors import PromptError
from ..kv.prefix import PrefixHandle, PrefixTree

TTL_SECONDS = {"5m": 300.0, "1h": 3600.0}


@dataclass(frozen=True)
class Breakpoint:
    """Keep a chat's states up to the end of message `message`'s first `chars` content characters.

    `ttl_s`: seconds to keep them (None: pinned until unpinned).
    """

    message: int
    chars: int
    ttl_s: float | None = TTL_SECONDS["5m"]


@dataclass(frozen=True)
class Kept:
    """One breakpoint's outcome: its token `offset` and the leading tokens the tree now holds for it."""

    offset: int
    held: int
    ttl_s: float | None


@dataclass(frozen=True)
class CacheReport:
    """A request's prompt tokens split as the cloud APIs count them (they sum to `prompt_tokens`).

    Attributes:
        prompt_tokens: every prompt token.
        read_tokens: tokens whose states were read from the cache.
        written: tokens written (kept) for the first time by this request, by TTL in seconds (None: pinned).
    """

    prompt_tokens: int
    read_tokens: int
    written: dict[float | None, int] = field(default_factory=dict)

    @property
    def write_tokens(self) -> int:
        return sum(self.written.values())

    @property
    def input_tokens(self) -> int:
        """Tokens after the last cache read or write."""
        return self.prompt_tokens - self.read_tokens - self.write_tokens


def cache_report(prompt_tokens: int, read_tokens: int, kept: Sequence[Kept]) -> CacheReport:
    """Split a prompt: the tokens read, those newly kept up to each breakpoint (by its TTL), the rest."""
    written: dict[float | None, int] = {}
    end = read_tokens
    for k in sorted(kept, key=lambda k: k.offset):
        if k.held > end:
            written[k.ttl_s] = written.get(k.ttl_s, 0) + k.held - end
            end = k.held
    return CacheReport(prompt_tokens, read_tokens, written)


@dataclass(frozen=True)
class KeptEntry:
    """A kept prefix, as listed: its tenant, tokens, bytes, TTL, seconds left and whether pinned."""

    namespace: str
    tokens: int
    ttl_s: float | None
    expires_in_s: float | None
    pinned: bool
    key: str


@dataclass
class _Hold:
    handle: PrefixHandle
    tokens: int
    ttl_s: float | None
    expires: float | None


class PrefixKeeper:
    """Holds prefix-tree nodes up to token offsets, each for its TTL (thread-safe).

    Args:
        tree: the engine's prefix tree.
        clock: seconds source for the TTLs (injectable for tests).
    """

    def __init__(self, tree: PrefixTree, clock: Callable[[], float] = time.monotonic):
        self.tree, self._clock = tree, clock
        self._lock = threading.Lock()
        self._holds: dict[tuple[str, tuple[int, ...]], _Hold] = {}

    def keep(self, token_ids: Sequence[int], offset: int, ttl_s: float | None, namespace: str = "") -> int:
        """Hold the tree's states of `token_ids[:offset]` for `ttl_s` seconds; the tokens now held (0: none)."""
        ids = tuple(int(t) for t in token_ids[:offset])
        match = self.tree.match(ids, namespace)
        if match.length == 0:
            match.release()
            return 0
        key = (namespace, ids[: match.length])
        now = self._clock()
        with self._lock:
            self._sweep(now)
            old = self._holds.get(key)
            pinned = ttl_s is None or (old is not None and old.ttl_s is None)
            ttl = None if pinned else max(ttl_s, old.ttl_s if old is not None else 0.0)
            self._holds[key] = _Hold(match.handle, match.length, ttl, None if ttl is None else now + ttl)
        if old is not None:
            old.handle.release()
        return match.length

    def entries(self) -> list[KeptEntry]:
        """Every kept prefix, the longest-lived first."""
        now = self._clock()
        with self._lock:
            self._sweep(now)
            out = [KeptEntry(ns, h.tokens, h.ttl_s, None if h.expires is None else h.expires - now,
                             h.expires is None, _key(ns, ids)) for (ns, ids), h in self._holds.items()]
        return sorted(out, key=lambda e: (not e.pinned, -(e.expires_in_s or 0.0)))

    def pin(self, key: str, pinned: bool = True, ttl_s: float = TTL_SECONDS["5m"]) -> KeptEntry:
        """Pin a kept prefix (no expiry), or unpin it (it then expires `ttl_s` from now)."""
        with self._lock:
            found = self._find(key)
            hold = self._holds[found]
            hold.ttl_s, hold.expires = (None, None) if pinned else (ttl_s, self._clock() + ttl_s)
        return next(e for e in self.entries() if e.key == key)

    def release(self, key: str) -> None:
        """Stop keeping a prefix (the tree may then evict it as any other)."""
        with self._lock:
            hold = self._holds.pop(self._find(key))
        hold.handle.release()

    def _find(self, key: str) -> tuple[str, tuple[int, ...]]:
        for k in self._holds:
            if _key(*k) == key:
                return k
        raise PromptError(f"no kept prefix {key!r:.80}; kept: {', '.join(_key(*k) for k in self._holds) or '(none)'}")

    def _sweep(self, now: float) -> None:
        for key in [k for k, h in self._holds.items() if h.expires is not None and h.expires <= now]:
            self._holds.pop(key).handle.release()


def _key(namespace: str, ids: tuple[int, ...]) -> str:
    """A stable public name of a kept prefix (its tenant and tokens, hashed)."""
    digest = hashlib.sha256(repr((namespace, ids)).encode()).hexdigest()
    return digest[:16]


def breakpoint_offsets(plan_ids: Callable[[list[dict[str, str]]], Sequence[int]], messages: Sequence[dict],
                       breakpoints: Sequence[Breakpoint]) -> list[int]:
    """Each breakpoint's token offset in the chat's ids: the tokens the chat shares with the chat cut there.

    Args:
        plan_ids: a chat's token ids (the engine's tokenization, generation prompt included).
        messages: the whole chat.
        breakpoints: where to cut (PromptError naming one that points outside the chat).
    """
    full = list(plan_ids(list(messages)))
    offsets = []
    for b in breakpoints:
        if not 0 <= b.message < len(messages) or not 0 <= b.chars <= len(messages[b.message]["content"]):
            raise PromptError(f"breakpoint {b} points outside the chat ({len(messages)} messages)")
        cut = [*messages[: b.message], {**messages[b.message], "content": messages[b.message]["content"][: b.chars]}]
        ids = plan_ids(cut)
        n = 0
        while n < min(len(ids), len(full)) and ids[n] == full[n]:
            n += 1
        offsets.append(n)
    return offsets
