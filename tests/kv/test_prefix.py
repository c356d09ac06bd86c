"""PrefixTree: lookups, splits, namespaces, leaf-first LRU eviction, refcounts, TTL, threads."""

from __future__ import annotations

import random

import pytest
import torch

from promptcache.errors import PromptCacheError, StoreError
from promptcache.kv.prefix import DEFAULT_PREFIX_BUDGET_BYTES, PrefixTree
from promptcache.kv.states import KVStates

from .helpers import run_threads

LAYERS, HEADS, DIM = 2, 2, 4
TOKEN_BYTES = LAYERS * 2 * HEADS * DIM * 4  # float32 k and v per token


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def rand_states(ids: list[int], seed: int = 0) -> KVStates:
    """Random states for `ids` at positions 0..n-1."""
    g = torch.Generator().manual_seed(seed)
    n = len(ids)

    def layer() -> torch.Tensor:
        return torch.randn(1, HEADS, n, DIM, generator=g)  # [1, kv_heads, seq, head_dim]

    return KVStates(tuple(ids), torch.arange(n), tuple(layer() for _ in range(LAYERS)),
                    tuple(layer() for _ in range(LAYERS)))


def det_states(ids: list[int]) -> KVStates:
    """States whose every entry is a function of (token, position): any correct match can be checked."""
    n = len(ids)
    code = torch.tensor([t * 1000 + j for j, t in enumerate(ids)], dtype=torch.float32)
    k = code.view(1, 1, n, 1).expand(1, HEADS, n, DIM).contiguous()
    return KVStates(tuple(ids), torch.arange(n), (k,) * LAYERS, (-k,) * LAYERS)


def assert_same(parts: list[KVStates], expected: KVStates) -> None:
    got = KVStates.concat(parts)
    assert got.token_ids == expected.token_ids
    assert torch.equal(got.positions, expected.positions)
    for a, b in zip((*got.keys, *got.values), (*expected.keys, *expected.values), strict=True):
        assert torch.equal(a, b)


def matched(tree: PrefixTree, ids: list[int], namespace: str = "") -> int:
    with tree.match(ids, namespace) as m:
        return m.length


def test_empty_tree_and_lookups():
    tree = PrefixTree()
    m = tree.match([1, 2, 3])
    assert (m.length, m.states) == (0, [])
    m.release()
    ids = [1, 2, 3, 4, 5, 6, 7, 8]
    s = rand_states(ids)
    assert tree.insert(ids, s) == 8
    assert (len(tree), tree.num_tokens, tree.nbytes) == (1, 8, 8 * TOKEN_BYTES)
    with tree.match(ids + [9, 10]) as m:
        assert m.length == 8
        assert_same(m.states, s)
    with tree.match([1, 2, 3, 99]) as m:  # ends inside a node: a view of its first 3 tokens
        assert m.length == 3
        assert_same(m.states, s.slice(0, 3))
    assert matched(tree, [9, 1, 2]) == 0
    assert tree.insert(ids, s) == 0  # already cached
    assert tree.insert(ids[:5], s.slice(0, 5)) == 0  # a prefix of a node: no split needed
    assert len(tree) == 1


def test_split_keeps_states_correct():
    tree = PrefixTree()
    a = [1, 2, 3, 4, 5, 6, 7, 8]
    b = a[:3] + [20, 21, 22]
    sa, sb = rand_states(a, seed=1), rand_states(b, seed=2)
    assert tree.insert(a, sa) == 8
    assert tree.insert(b, sb) == 3
    assert (len(tree), tree.num_tokens, tree.nbytes) == (3, 11, 11 * TOKEN_BYTES)
    with tree.match(a) as m:
        assert m.length == 8 and [len(p) for p in m.states] == [3, 5]
        assert_same(m.states, sa)
    with tree.match(b + [23]) as m:
        assert m.length == 6
        # The shared head keeps the first writer's states; the new branch is b's.
        assert_same(m.states, KVStates.concat([sa.slice(0, 3), sb.slice(3, 6)]))
    c = a[:5] + [30]  # split the tail node [4..8] again
    sc = rand_states(c, seed=3)
    assert tree.insert(c, sc) == 1
    with tree.match(c) as m:
        assert [len(p) for p in m.states] == [3, 2, 1]
        assert_same(m.states, KVStates.concat([sa.slice(0, 5), sc.slice(5, 6)]))
    with tree.match(a) as m:
        assert_same(m.states, sa)


def test_new_nodes_are_compact_copies():
    tree = PrefixTree()
    ids = list(range(1, 65))
    s = rand_states(ids)
    tree.insert(ids[:4], s.slice(0, 4))
    tree.insert(ids, s)
    with tree.match(ids) as m:
        for part in m.states:
            for t in (*part.keys, *part.values):
                assert t.is_contiguous()
                assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
        assert_same(m.states, s)


def test_namespaces_are_isolated():
    ids = [5, 6, 7, 8]
    tree = PrefixTree()
    tree.insert(ids, rand_states(ids), namespace="tenant-a")
    assert matched(tree, ids, "tenant-a") == 4
    assert matched(tree, ids, "tenant-b") == 0
    assert matched(tree, ids) == 0
    assert tree.insert(ids, rand_states(ids), namespace="tenant-b") == 4
    shared = PrefixTree(namespace_aware=False)
    shared.insert(ids, rand_states(ids), namespace="tenant-a")
    assert matched(shared, ids, "tenant-b") == 4


def test_leaf_first_lru_eviction_order_exact():
    tree = PrefixTree()
    a, b, c = [1, 2, 3, 4], [1, 2, 5, 6], [7, 8]
    for ids in (a, b, c):
        tree.insert(ids, rand_states(ids))
    # Nodes: [1 2] -> {[3 4], [5 6]}, [7 8]; a parent never comes before its children.
    assert tree.eviction_order() == [("", (1, 2, 3, 4)), ("", (1, 2, 5, 6)), ("", (1, 2)), ("", (7, 8))]
    assert matched(tree, a) == 4  # touches [3 4] and [1 2]
    expected = [("", (1, 2, 5, 6)), ("", (7, 8)), ("", (1, 2, 3, 4)), ("", (1, 2))]
    assert tree.eviction_order() == expected
    for i in range(4):
        assert tree.evict(1) == 2 * TOKEN_BYTES
        assert tree.eviction_order() == expected[i + 1:]
    assert (len(tree), tree.nbytes, tree.num_tokens) == (0, 0, 0)
    assert tree.evict(1) == 0


def test_eviction_order_after_splits_touches_and_budget_exact():
    tree = PrefixTree(budget_bytes=7 * TOKEN_BYTES)
    for ids in ([1, 2, 3, 4], [1, 2, 5], [9]):  # [1 2 5] splits [1 2 3 4] into [1 2] -> {[3 4], [5]}
        tree.insert(ids, rand_states(ids))
    assert matched(tree, [1, 2, 3, 4]) == 4  # uses [3 4], then its parent [1 2]
    assert tree.eviction_order() == [("", (1, 2, 5)), ("", (9,)), ("", (1, 2, 3, 4)), ("", (1, 2))]
    assert tree.insert([7, 7], rand_states([7, 7])) == 2  # 6 + 2 > 7 tokens: the LRU leaf [5] goes
    assert tree.eviction_order() == [("", (9,)), ("", (1, 2, 3, 4)), ("", (1, 2)), ("", (7, 7))]
    assert tree.insert([8, 8, 8], rand_states([8, 8, 8])) == 3  # 7 + 3 > 7: [9], then [3 4]
    # [1 2] is a leaf now, and was used before [7 7] was written.
    assert tree.eviction_order() == [("", (1, 2)), ("", (7, 7)), ("", (8, 8, 8))]
    assert tree.nbytes == 7 * TOKEN_BYTES


def test_default_budget_is_bounded():
    assert PrefixTree().budget_bytes == DEFAULT_PREFIX_BUDGET_BYTES == 1 << 30
    assert PrefixTree(None).budget_bytes is None  # unbounded only when asked for


@pytest.mark.parametrize("bad", [-1, 1.5, "10", True])
def test_bad_budget_is_a_store_error(bad):
    with pytest.raises(StoreError, match="budget_bytes"):
        PrefixTree(bad)


def test_eviction_order_skips_acquired_paths():
    tree = PrefixTree()
    for ids in ([1, 2, 3, 4], [1, 2, 5, 6], [7, 8]):
        tree.insert(ids, rand_states(ids))
    with tree.match([1, 2, 5, 9]):  # holds [1 2] and [5 6]
        assert tree.eviction_order() == [("", (1, 2, 3, 4)), ("", (7, 8))]
        assert tree.evict(10**9) == 4 * TOKEN_BYTES
    assert tree.eviction_order() == [("", (1, 2, 5, 6)), ("", (1, 2))]


def test_budget_enforced_on_insert():
    tree = PrefixTree(budget_bytes=10 * TOKEN_BYTES)
    x, y, z = [1] * 4, [2] * 4, [3] * 4
    for ids in (x, y):
        tree.insert(ids, rand_states(ids))
    assert matched(tree, x) == 4  # y is now least recently used
    assert tree.insert(z, rand_states(z)) == 4  # 12 > 10: y goes
    assert [matched(tree, ids) for ids in (x, y, z)] == [4, 0, 4]
    big = list(range(100, 111))
    assert tree.insert(big, rand_states(big)) == 0  # larger than the budget: not stored, nothing evicted
    assert [matched(tree, ids) for ids in (x, z)] == [4, 4]
    assert tree.nbytes <= tree.budget_bytes


def test_acquired_nodes_are_never_evicted():
    tree = PrefixTree(budget_bytes=8 * TOKEN_BYTES)
    x, y = [1, 2, 3, 4], [5, 6, 7, 8]
    sx = rand_states(x)
    tree.insert(x, sx)
    tree.insert(y, rand_states(y))
    held = tree.match(x[:2])  # acquires the whole [1 2 3 4] node, though it matched only 2 tokens
    assert tree.evict(10**9) == 4 * TOKEN_BYTES  # only y
    assert matched(tree, x) == 4
    z = [9, 9, 9, 9, 9]
    assert tree.insert(z, rand_states(z)) == 0  # x is in use: no room
    assert tree.insert(x + [10], rand_states(x + [10])) == 1  # its own path is protected, not evicted
    held.release()
    held.release()  # idempotent
    assert_same(held.states, sx.slice(0, 2))  # views stay valid after release
    assert tree.insert(z, rand_states(z)) == 5  # now x's nodes can go
    assert matched(tree, x) == 0


def test_split_of_an_acquired_node():
    tree = PrefixTree()
    a = [1, 2, 3, 4]
    sa = rand_states(a)
    tree.insert(a, sa)
    with tree.match(a) as m:
        tree.insert([1, 2, 9], rand_states([1, 2, 9]))  # splits the held node
        assert tree.evict(10**9) == TOKEN_BYTES  # only the new leaf [9]; head and held tail stay
        assert_same(m.states, sa)
    assert tree.evict(10**9) == 4 * TOKEN_BYTES
    assert len(tree) == 0


def test_ttl_expiry():
    clock = FakeClock()
    tree = PrefixTree(ttl_s=10, clock=clock)
    a, b = [1, 2, 3], [4, 5, 6]
    tree.insert(a, rand_states(a))
    clock.now = 6
    tree.insert(b, rand_states(b))
    clock.now = 11  # a idle 11 > 10, b idle 5
    assert matched(tree, a) == 0
    assert matched(tree, b) == 3
    assert len(tree) == 1
    with tree.match(b):
        clock.now = 100
        assert tree.evict(0) == 0  # expired but in use: kept
    assert tree.evict(0) == 3 * TOKEN_BYTES


@pytest.mark.parametrize("bad", [
    lambda s: KVStates((9, 9, 9), s.positions, s.keys, s.values),  # token ids differ
    lambda s: KVStates(s.token_ids, s.positions + 5, s.keys, s.values),  # not positions 0..n-1
])
def test_insert_validates_states(bad):
    ids = [1, 2, 3]
    with pytest.raises(PromptCacheError):
        PrefixTree().insert(ids, bad(rand_states(ids)))


def test_thread_safety_smoke():
    tree = PrefixTree(budget_bytes=60 * TOKEN_BYTES)

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(200):
            ids = [rng.randrange(3) for _ in range(rng.randrange(1, 12))]
            if rng.random() < 0.5:
                tree.insert(ids, det_states(ids), namespace=str(seed % 2))
            with tree.match(ids, namespace=str(seed % 2)) as m:
                if m.length:
                    assert_same(m.states, det_states(ids[: m.length]))

    run_threads(work)
    assert tree.nbytes <= tree.budget_bytes
    held = tree.num_tokens
    assert held > 0 and tree.nbytes == held * TOKEN_BYTES
    assert tree.evict(10**9) == held * TOKEN_BYTES
    assert (len(tree), tree.nbytes, tree.num_tokens) == (0, 0, 0)
