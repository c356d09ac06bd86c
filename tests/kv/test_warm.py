"""Warm blocks: what a block holds is checked before a request keeps it; only the rest is copied."""

from __future__ import annotations

import gc
import weakref

import torch

from promptcache.kv.cache import request_cache
from promptcache.kv.pool import BufferPool
from promptcache.kv.states import KVStates
from promptcache.kv.warm import Contents, Reuse, contents_of, reusable, same_states

from .helpers import run_threads

LAYERS, HEADS, DIM = 2, 2, 4
GEOMETRY = {"num_layers": LAYERS, "kv_heads": HEADS, "head_dim": DIM, "device": "cpu", "dtype": torch.float32}


def states(n: int, start: int = 0, seed: int = 0) -> KVStates:
    g = torch.Generator().manual_seed(seed)
    return KVStates(tuple(range(100 + start, 100 + start + n)), torch.arange(start, start + n),
                    tuple(torch.randn(1, HEADS, n, DIM, generator=g) for _ in range(LAYERS)),
                    tuple(torch.randn(1, HEADS, n, DIM, generator=g) for _ in range(LAYERS)))


def copy_of(s: KVStates) -> KVStates:
    return KVStates(s.token_ids, s.positions.clone(), tuple(k.clone() for k in s.keys),
                    tuple(v.clone() for v in s.values))


def test_prefix_contents_keep_the_common_start_of_the_same_namespace():
    held = Contents("prefix", "a", (1, 2, 3, 4, 5))
    assert reusable(held, Reuse("prefix", "a", (1, 2, 3, 9)), []) == 3
    assert reusable(held, Reuse("prefix", "a", (1, 2, 3, 4, 5, 6, 7)), []) == 5
    assert reusable(held, Reuse("prefix", "a", (1, 2)), []) == 2
    assert reusable(held, Reuse("prefix", "a", (7, 2, 3)), []) == 0
    assert reusable(held, Reuse("prefix", "b", (1, 2, 3)), []) == 0  # another tenant's block
    assert reusable(held, Reuse("modules"), []) == 0
    assert reusable(None, Reuse("prefix", "a", (1,)), []) == 0


def test_module_runs_are_kept_only_for_the_same_stored_tensors():
    a, b = states(3, seed=1), states(2, start=3, seed=2)
    held = Contents("modules", runs=(a, b))
    assert reusable(held, Reuse("modules"), [a, b]) == 5
    assert reusable(held, Reuse("modules"), [a, states(2, start=3, seed=3)]) == 3
    assert reusable(held, Reuse("modules"), [copy_of(a), b]) == 0  # equal values, other tensors: re-encoded
    assert reusable(held, Reuse("modules"), [a.slice(0, 3), b.slice(0, 2)]) == 5  # views of the same storage
    assert reusable(held, Reuse("modules"), [a.slice(0, 2)]) == 0  # a shorter view is another run
    assert not same_states(a.slice(1, 3), KVStates.concat([a]).slice(1, 3))
    assert same_states(a.slice(1, 3), a.slice(1, 3))


def test_a_warm_block_is_continued_without_copying_what_it_holds():
    pool = BufferPool()
    a, b, c = states(3, seed=1), states(2, start=3, seed=2), states(2, start=5, seed=4)
    first = request_cache([a, b], 8, **GEOMETRY, pool=pool, reuse=Reuse("modules"))
    block = first.block
    block[:, :, :, :, :3] = 7.0  # a marker where a's copy is: kept slots are not copied again
    pool.give(block, contents_of(first, None))
    second = request_cache([a, c], 8, **GEOMETRY, pool=pool, reuse=Reuse("modules"))
    assert second.block is block and second.kept == 3 and pool.warm_hits == 1 and pool.kept_tokens == 3
    assert bool((block[:, :, :, :, :3] == 7.0).all())
    for i, layer in enumerate(second.layers):
        assert torch.equal(layer.keys[:, :, 3:], c.keys[i]) and torch.equal(layer.values[:, :, 3:], c.values[i])
    assert second.spliced_positions.tolist() == [0, 1, 2, 5, 6]


def test_a_warm_prefix_may_hold_more_than_the_parts():
    pool = BufferPool()
    a = states(4, seed=1)
    first = request_cache([a], 8, **GEOMETRY, pool=pool, reuse=Reuse("prefix", "", a.token_ids))
    ids = list(a.token_ids) + [7, 8]  # two more tokens computed and fed into slots 4 and 5
    for layer in first.layers:
        layer.update(torch.zeros(1, HEADS, 2, DIM), torch.zeros(1, HEADS, 2, DIM))
    pool.give(first.block, contents_of(first, ids))
    want = Reuse("prefix", "", (*ids[:5], 9))
    second = request_cache([a.slice(0, 2)], 8, **GEOMETRY, pool=pool, reuse=want)
    assert second.kept == 5 and second.get_seq_length() == 5
    assert second.spliced_positions.tolist() == [0, 1, 2, 3, 4]


def test_records_that_do_not_describe_the_block_are_dropped():
    pool = BufferPool()
    cache = request_cache([states(3)], 8, **GEOMETRY, pool=pool, reuse=Reuse("prefix", "", (100, 101, 102)))
    assert contents_of(cache, [100, 101]) is None  # ids for fewer slots than are filled
    assert contents_of(cache, None) is None
    plain = request_cache([states(3)], 8, **GEOMETRY, pool=pool)
    assert contents_of(plain, [100, 101, 102]) is None  # made without reuse: nothing to keep


def test_take_prefers_the_block_kept_most_and_plain_takes_spare_warm_ones():
    pool = BufferPool()
    a = states(3, seed=1)
    cold = request_cache([], 8, **GEOMETRY, pool=pool)
    warm = request_cache([a], 8, **GEOMETRY, pool=pool, reuse=Reuse("modules"))
    pool.give(warm.block, contents_of(warm, None))
    pool.give(cold.block)
    assert request_cache([], 8, **GEOMETRY, pool=pool).block is cold.block  # not the warm one
    pool.give(cold.block)
    assert request_cache([a], 8, **GEOMETRY, pool=pool, reuse=Reuse("modules")).block is warm.block


def test_evicted_blocks_release_the_states_their_records_hold():
    pool = BufferPool(max_blocks=1)
    a = states(3, seed=1)
    cache = request_cache([a], 8, **GEOMETRY, pool=pool, reuse=Reuse("modules"))
    pool.give(cache.block, contents_of(cache, None))
    held = weakref.ref(a)
    del a, cache
    gc.collect()
    assert held() is not None  # the record keeps the copied run alive: its identity stays unique
    pool.give(request_cache([], 300, **GEOMETRY).block)  # a new block pushes the warm one out
    gc.collect()
    assert held() is None


def test_threads_never_hold_the_same_warm_block():
    pool = BufferPool(max_blocks=3)
    a = states(3, seed=1)
    held: set[int] = set()

    def work(tag: int):
        for _ in range(100):
            cache = request_cache([a], 8, **GEOMETRY, pool=pool, reuse=Reuse("modules"))
            ptr = cache.block.data_ptr()
            assert ptr not in held, "a block in use was handed out again"
            held.add(ptr)
            for i, layer in enumerate(cache.layers):
                assert torch.equal(layer.keys, a.keys[i])
            cache.block[:, :, :, :, 3:].fill_(tag)
            held.discard(ptr)
            pool.give(cache.block, contents_of(cache, None))

    run_threads(work, 4)
    assert pool.warm_hits > 0
