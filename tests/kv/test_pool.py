"""BufferPool: best-fit reuse, bounds, geometry and dtype checks, threads; splice into pooled blocks."""

from __future__ import annotations

import pytest
import torch

from promptcache.errors import StoreError
from promptcache.kv.cache import request_cache
from promptcache.kv.pool import ROUND, BufferPool
from promptcache.kv.states import KVStates

from .helpers import run_threads

LAYERS, HEADS, DIM = 2, 2, 4


def take(pool: BufferPool, capacity: int, dtype=torch.float32, heads: int = HEADS) -> torch.Tensor:
    return pool.take(LAYERS, 1, heads, capacity, DIM, dtype, "cpu")


def states(n: int, start: int = 0, seed: int = 0) -> KVStates:
    g = torch.Generator().manual_seed(seed)
    return KVStates(tuple(range(start, start + n)), torch.arange(start, start + n),
                    tuple(torch.randn(1, HEADS, n, DIM, generator=g) for _ in range(LAYERS)),
                    tuple(torch.randn(1, HEADS, n, DIM, generator=g) for _ in range(LAYERS)))


def test_block_shape_and_rounding():
    block = take(BufferPool(), 10)
    assert block.shape == (2, LAYERS, 1, HEADS, ROUND, DIM)
    assert take(BufferPool(), ROUND + 1).shape[-2] == 2 * ROUND
    assert take(BufferPool(0), 10).shape[-2] == 10  # a disabled pool allocates exactly


def test_given_block_is_reused_best_fit():
    pool = BufferPool()
    small, big = take(pool, 100), take(pool, 1000)
    pool.give(big)
    pool.give(small)
    assert take(pool, 50).data_ptr() == small.data_ptr()  # smallest that fits, not the newest
    assert take(pool, 50).data_ptr() == big.data_ptr()
    assert take(pool, 50).data_ptr() not in (small.data_ptr(), big.data_ptr())  # none idle: new
    assert (pool.hits, pool.misses) == (2, 3)


def test_too_small_or_other_geometry_or_dtype_is_not_reused():
    pool = BufferPool()
    block = take(pool, 10)
    pool.give(block)
    for other in (take(pool, ROUND + 1), take(pool, 10, torch.float16), take(pool, 10, heads=HEADS + 1)):
        assert other.data_ptr() != block.data_ptr()
    assert take(pool, 10).data_ptr() == block.data_ptr()


def test_idle_blocks_are_bounded_oldest_dropped():
    pool = BufferPool(max_blocks=2)
    blocks = [take(pool, 10) for _ in range(3)]
    for b in blocks:
        pool.give(b)
    assert pool.idle_bytes == 2 * blocks[0].numel() * 4
    kept = {take(pool, 10).data_ptr(), take(pool, 10).data_ptr()}
    assert kept == {blocks[1].data_ptr(), blocks[2].data_ptr()}
    off = BufferPool(max_blocks=0)
    off.give(take(off, 10))
    assert off.idle_bytes == 0
    pool.give(blocks[0])
    pool.clear()
    assert pool.idle_bytes == 0


@pytest.mark.parametrize("bad", [-1, 1.5, "4", True])
def test_bad_size_is_a_store_error(bad):
    with pytest.raises(StoreError, match="pool_blocks"):
        BufferPool(bad)


def test_threads_never_share_a_block():
    pool = BufferPool(max_blocks=8)
    seen = []

    def work(tag: int):
        for _ in range(200):
            block = take(pool, 10)
            block.fill_(tag)
            assert bool((block == tag).all()), "another thread wrote into this block"
            seen.append(block.data_ptr())
            pool.give(block)

    run_threads(work, 4)
    assert len(set(seen)) <= 4 + 8  # reuse happened: at most one live block per thread plus the idle ones


def test_splice_into_a_reused_block_shows_only_its_own_tokens():
    pool = BufferPool()
    geometry = {"num_layers": LAYERS, "kv_heads": HEADS, "head_dim": DIM, "device": "cpu", "dtype": torch.float32}
    big = request_cache([states(40, seed=1)], 60, pool=pool, **geometry)
    pool.give(big.block)
    a, b = states(5, seed=2), states(3, start=5, seed=3)
    cache = request_cache([a, b], 12, pool=pool, **geometry)
    pos = cache.spliced_positions
    assert cache.block.data_ptr() == big.block.data_ptr()
    assert pos.tolist() == list(range(8))
    for i, layer in enumerate(cache.layers):
        assert layer.get_seq_length() == 8 and layer.keys.shape[-2] == 8
        assert torch.equal(layer.keys, torch.cat([a.keys[i], b.keys[i]], dim=2))
        assert torch.equal(layer.values, torch.cat([a.values[i], b.values[i]], dim=2))
    new = torch.ones(1, HEADS, 2, DIM)
    k, _ = cache.layers[0].update(new, new)
    assert k.shape[-2] == 10 and torch.equal(k[:, :, 8:], new)
    assert request_cache([], 4, pool=pool, **geometry).layers[0].get_seq_length() == 0


def test_idle_blocks_count_against_a_byte_budget_oldest_dropped():
    one = take(BufferPool(0), ROUND).numel() * 4  # bytes of a block of ROUND slots
    pool = BufferPool(max_blocks=8, max_bytes=2 * one + one // 2)
    first, second, third = take(pool, ROUND), take(pool, ROUND), take(pool, ROUND)
    for block in (first, second, third):
        pool.give(block)
    assert pool.idle_bytes == 2 * one  # the oldest went: three would pass the budget
    kept = {id(take(pool, ROUND)), id(take(pool, ROUND))}
    assert kept == {id(second), id(third)} and pool.idle_bytes == 0
    pool.give(take(BufferPool(0), 4 * ROUND))  # bigger than the whole budget: never kept
    assert pool.idle_bytes == 0
    with pytest.raises(StoreError, match="pool_bytes must be an int >= 0 or None"):
        BufferPool(max_bytes=-1)


def test_a_request_cache_grows_in_place_of_its_block_keeping_its_states():
    pool = BufferPool()
    cache = request_cache([states(5)], 6, num_layers=LAYERS, kv_heads=HEADS, head_dim=DIM, device="cpu",
                          dtype=torch.float32, pool=pool)
    before = [layer.keys.clone() for layer in cache.layers]
    small = cache.block
    cache.reserve(cache.capacity + 1)
    assert cache.capacity > small.shape[-2] and cache.block is not small
    assert all(torch.equal(layer.keys, k) for layer, k in zip(cache.layers, before))
    assert pool.idle_bytes == small.numel() * 4  # the outgrown block went back to the pool
    cache.reserve(cache.capacity)  # room enough: nothing changes
    assert pool.idle_bytes == small.numel() * 4
