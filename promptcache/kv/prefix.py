"""Automatic prefix reuse: a radix tree over token ids whose nodes hold the KV states of their token span.

Positions are absolute (0-based index in the sequence), so a cached prefix's states are valid for any
continuation of that prefix. Each namespace (tenant cache salt) has its own root: one namespace never
matches another's prefix.

    root("tenant-a")
     └─ [1 2 3 4]          positions 0..3
         ├─ [5 6]          positions 4..5
         └─ [7 8 9]        positions 4..6
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from promptcache.errors import PromptCacheError, StoreError
from promptcache.kv.policy import LRUPolicy
from promptcache.kv.states import KVStates

DEFAULT_PREFIX_BUDGET_BYTES = 1 << 30
"""The prefix tree's byte budget unless one is given: 1 GiB of states.

NOTE: a fixed size, not a share of free memory: it behaves the same on every machine and in every test,
and the states live on the model's device, whose free memory the host cannot judge. 1 GiB holds ~4,000
requests of ~250 tokens on a tiny model (~1 KiB/token), ~2,000 tokens of a 7B fp16 model (0.5 MiB/token):
enough for the hot system prompts and recent chats; pass `budget_bytes` to size it for the deployment.
"""

class _Node:
    """One edge of the radix tree: a token span and its states. Roots have no tokens and no states."""

    __slots__ = ("tokens", "states", "parent", "children", "namespace")

    def __init__(self, tokens: tuple[int, ...], states: KVStates | None, parent: _Node | None,
                 namespace: str):
        self.tokens = tokens
        self.states = states
        self.parent = parent
        self.children: dict[int, _Node] = {}  # keyed by the child's first token
        self.namespace = namespace


class PrefixHandle:
    """Keeps the matched nodes in use (never evicted) until `release`; releasing twice is harmless."""

    def __init__(self, tree: PrefixTree, nodes: list[_Node]):
        self._tree = tree
        self._nodes = nodes

    def release(self) -> None:
        self._tree._release(self)


@dataclass(frozen=True)
class PrefixMatch:
    """The longest cached prefix of a request.

    Attributes:
        length: number of leading tokens covered.
        states: views of node states, in order, covering exactly `length` tokens (positions 0..length-1).
        handle: keeps those nodes from eviction until released; `with match:` releases on exit.
    """

    length: int
    states: list[KVStates]
    handle: PrefixHandle

    def release(self) -> None:
        self.handle.release()

    def __enter__(self) -> PrefixMatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.release()


class PrefixTree:
    """A thread-safe radix tree of KV states, bounded by bytes and idle time.

    Eviction order (asserted exactly in tests/kv/test_prefix.py):

    1. Expired nodes (idle > `ttl_s`), least recently used first, before anything else.
    2. Then, until the bytes needed are free: the least recently used leaf. Only leaves go (a node's
       states are needed by all its descendants); a parent whose children are all gone is a leaf.
    Never evicted: nodes held by an unreleased `PrefixMatch`, and their ancestors (a match holds its
    whole path).

    A match or insert counts as a use of every node on its path, deepest first, so a parent is always
    more recently used than its children: one pass over the LRU order then meets every child before
    its parent, and picking "the LRU leaf" repeatedly is that pass.

    Args:
        budget_bytes: the most bytes of states kept (default `DEFAULT_PREFIX_BUDGET_BYTES`), or None for
            no limit.
        ttl_s: idle seconds after which a node expires (checked lazily on each call), or None.
        namespace_aware: when False, the `namespace` arguments are ignored and everything shares one root.
        clock: seconds source for the TTL (injectable for tests).
    """

    def __init__(self, budget_bytes: int | None = DEFAULT_PREFIX_BUDGET_BYTES, ttl_s: float | None = None,
                 namespace_aware: bool = True, clock: Callable[[], float] = time.monotonic):
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, type(None))):
            raise StoreError(f"budget_bytes must be an int >= 0 or None, got {budget_bytes!r}")
        self.namespace_aware = namespace_aware
        # NOTE: the policy only does the byte arithmetic; its `victims` are not leaf-first, so the tree
        # picks victims itself (`_leaf_first`).
        self._policy = LRUPolicy(budget_bytes, ttl_s, clock)
        self._lock = threading.RLock()
        self._roots: dict[str, _Node] = {}
        self._num_tokens = 0

    def match(self, token_ids: Sequence[int], namespace: str = "") -> PrefixMatch:
        """The longest cached prefix of `token_ids` in `namespace`.

        The engine decides how much of it to use (e.g. it must leave at least one token to compute).

        Returns:
            A `PrefixMatch`; release it (or use it as a context manager) once its states are copied.
        """
        ids = tuple(int(t) for t in token_ids)
        with self._lock:
            self._expire()
            path, length, last = self._walk(ids, namespace)
            states = [node.states for node in path]
            if path and last < len(path[-1].tokens):
                states[-1] = states[-1].slice(0, last)
            for node in path:
                self._policy.acquire(node)
            if path:
                self._touch_path(path[-1])
            return PrefixMatch(length, states, PrefixHandle(self, path))

    def insert(self, token_ids: Sequence[int], states: KVStates, namespace: str = "") -> int:
        """Store `states` for `token_ids`, keeping only the part not already cached.

        The new part is stored as a contiguous copy (a big request tensor is not kept alive by a view).
        If it cannot fit the budget even after evicting every evictable leaf, nothing is stored.

        Args:
            token_ids: the whole sequence, from position 0.
            states: states of all of `token_ids`, positions 0..n-1.
            namespace: tenant cache salt.

        Returns:
            The number of tokens newly written (0 when already cached or when it cannot fit).
        """
        ids = tuple(int(t) for t in token_ids)
        _check_states(ids, states)
        with self._lock:
            self._expire()
            path, length, last = self._walk(ids, namespace)
            if path:
                self._touch_path(path[-1])
            if length == len(ids):
                return 0
            new = KVStates.concat([states.slice(length, len(ids))])
            if not self._make_room(new.nbytes, protect=path):
                return 0
            if not path:
                parent = self._root(namespace)
            elif last < len(path[-1].tokens):
                parent = self._split(path[-1], last)
            else:
                parent = path[-1]
            leaf = _Node(ids[length:], new, parent, parent.namespace)
            parent.children[ids[length]] = leaf
            self._policy.add(leaf, new.nbytes)
            self._num_tokens += len(leaf.tokens)
            self._touch_path(leaf)
            return len(leaf.tokens)

    def evict(self, nbytes: int) -> int:
        """Free at least `nbytes` if possible: expired nodes, then leaf-first LRU. Returns bytes freed."""
        with self._lock:
            freed = self._expire()
            return freed + self._evict_lru(nbytes - freed)

    def eviction_order(self) -> list[tuple[str, tuple[int, ...]]]:
        """The nodes in the order `evict` would drop them now, if none expired; in-use nodes are left out.

        Returns:
            One `(namespace, token ids from position 0 to the node's end)` per node.
        """
        with self._lock:
            return [(node.namespace, _full_tokens(node)) for node in self._leaf_first(self._policy.order())]

    @property
    def budget_bytes(self) -> int | None:
        return self._policy.budget_bytes

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._policy.used_bytes

    @property
    def num_tokens(self) -> int:
        with self._lock:
            return self._num_tokens

    def __len__(self) -> int:
        """The number of nodes (token spans) held."""
        with self._lock:
            return len(self._policy)

    # -- internals ---------------------------------------------------------------------------------

    def _key(self, namespace: str) -> str:
        return namespace if self.namespace_aware else ""

    def _root(self, namespace: str) -> _Node:
        key = self._key(namespace)
        if key not in self._roots:
            self._roots[key] = _Node((), None, None, key)
        return self._roots[key]

    def _walk(self, ids: tuple[int, ...], namespace: str) -> tuple[list[_Node], int, int]:
        """Nodes on the longest matching path, tokens matched, and tokens matched in the last node."""
        node, path, length, last = self._roots.get(self._key(namespace)), [], 0, 0
        while node is not None and length < len(ids):
            child = node.children.get(ids[length])
            if child is None:
                break
            last = _common_length(child.tokens, ids, length)
            path.append(child)
            length += last
            node = child if last == len(child.tokens) else None
        return path, length, last

    def _touch_path(self, node: _Node) -> None:
        # Deepest first, so that in LRU order descendants always come before their ancestors.
        while node.parent is not None:
            self._policy.touch(node)
            node = node.parent

    def _split(self, node: _Node, k: int) -> _Node:
        """Cut `node` after its first `k` tokens; returns the new head (the node keeps the tail)."""
        assert node.parent is not None and node.states is not None and 0 < k < len(node.tokens)
        head = _Node(node.tokens[:k], KVStates.concat([node.states.slice(0, k)]), node.parent, node.namespace)
        tail = KVStates.concat([node.states.slice(k, len(node.tokens))])
        node.parent.children[head.tokens[0]] = head
        node.tokens, node.states, node.parent = node.tokens[k:], tail, head
        head.children[node.tokens[0]] = node
        self._policy.add(node, tail.nbytes)
        self._policy.add(head, head.states.nbytes)
        return head

    def _make_room(self, nbytes: int, protect: list[_Node]) -> bool:
        """Evict leaves (not `protect`) until `nbytes` more fit; False (nothing evicted) if they cannot."""
        if self._policy.fits(nbytes):
            return True
        for node in protect:
            self._policy.acquire(node)
        try:
            if not self._policy.could_fit(nbytes):
                return False
            self._evict_lru(self._policy.overflow(nbytes))
        finally:
            for node in protect:
                self._policy.release(node)
        return self._policy.fits(nbytes)

    def _leaf_first(self, candidates: list[_Node]) -> Iterator[_Node]:
        """`candidates` (LRU first) in eviction order: each once it is a leaf, given those yielded before.

        The one eviction loop: callers either only list the nodes or drop each as it comes.
        """
        gone: set[_Node] = set()
        for node in candidates:
            if not self._policy.in_use(node) and gone.issuperset(node.children.values()):
                gone.add(node)
                yield node

    def _evict_lru(self, nbytes: int) -> int:
        freed = 0
        for node in self._leaf_first(self._policy.order()):
            if freed >= nbytes:
                break
            freed += self._drop(node)
        return freed

    def _expire(self) -> int:
        return sum(self._drop(node) for node in list(self._leaf_first(self._policy.expired())))

    def _drop(self, node: _Node) -> int:
        parent = node.parent
        assert parent is not None and node.states is not None and not node.children
        del parent.children[node.tokens[0]]
        self._policy.remove(node)
        self._num_tokens -= len(node.tokens)
        if parent.parent is None and not parent.children:
            del self._roots[parent.namespace]
        return node.states.nbytes

    def _release(self, handle: PrefixHandle) -> None:
        with self._lock:
            nodes, handle._nodes = handle._nodes, []
            for node in nodes:
                self._policy.release(node)


def _full_tokens(node: _Node) -> tuple[int, ...]:
    spans = []
    while node.parent is not None:
        spans.append(node.tokens)
        node = node.parent
    return tuple(t for span in reversed(spans) for t in span)


def _common_length(span: tuple[int, ...], ids: tuple[int, ...], start: int) -> int:
    n = min(len(span), len(ids) - start)
    i = 0
    while i < n and span[i] == ids[start + i]:
        i += 1
    return i


def _check_states(ids: tuple[int, ...], states: KVStates) -> None:
    if tuple(states.token_ids) != ids:
        raise PromptCacheError(
            f"states cover {len(states)} tokens that differ from the {len(ids)} token ids given")
    expected = torch.arange(len(ids), dtype=states.positions.dtype, device=states.positions.device)
    if not torch.equal(states.positions, expected):
        raise PromptCacheError("prefix states must have positions 0..n-1 (absolute, from the start)")
