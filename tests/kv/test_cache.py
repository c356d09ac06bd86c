"""Request caches: splice-or-empty in one call, fixed capacity, the pool's block, states views out."""

from __future__ import annotations

import pytest
import torch

from promptcache.kv.cache import request_cache
from promptcache.kv.pool import BufferPool
from promptcache.kv.states import KVStates

LAYERS, HEADS, DIM = 2, 2, 4
GEOMETRY = {"num_layers": LAYERS, "kv_heads": HEADS, "head_dim": DIM, "device": "cpu", "dtype": torch.float32}


def states(n: int, start: int = 0, seed: int = 0) -> KVStates:
    g = torch.Generator().manual_seed(seed)
    return KVStates(tuple(range(100 + start, 100 + start + n)), torch.arange(start, start + n) * 2,
                    tuple(torch.randn(1, HEADS, n, DIM, generator=g) for _ in range(LAYERS)),
                    tuple(torch.randn(1, HEADS, n, DIM, generator=g) for _ in range(LAYERS)))


def test_parts_are_spliced_back_to_back_with_their_positions():
    a, b = states(3, seed=1), states(2, start=3, seed=2)
    cache = request_cache([a, b], 8, **GEOMETRY)
    assert cache.get_seq_length() == 5 and cache.capacity >= 8
    assert cache.spliced_positions.tolist() == [0, 2, 4, 6, 8]
    for i, layer in enumerate(cache.layers):
        assert torch.equal(layer.keys, torch.cat([a.keys[i], b.keys[i]], dim=2))
        assert torch.equal(layer.values, torch.cat([a.values[i], b.values[i]], dim=2))


def test_no_parts_is_an_empty_cache():
    cache = request_cache([], 6, **GEOMETRY, pool=BufferPool())
    assert cache.get_seq_length() == 0 and cache.capacity >= 6
    assert cache.spliced_positions.dtype == torch.long and cache.spliced_positions.shape == (0,)
    assert cache.block.shape[:4] == (2, LAYERS, 1, HEADS) and cache.block.shape[-1] == DIM


def test_capacity_is_at_least_the_spliced_tokens():
    cache = request_cache([states(7)], 2, **GEOMETRY)
    assert cache.capacity == 7 and cache.get_seq_length() == 7


def test_updates_write_in_place_into_the_block_the_pool_gets_back():
    pool = BufferPool()
    cache = request_cache([states(3)], 5, **GEOMETRY, pool=pool)
    block = cache.block
    new = torch.ones(1, HEADS, cache.capacity - 3, DIM)
    for i, layer in enumerate(cache.layers):
        keys, _ = layer.update(new, -new)
        assert keys.shape[-2] == cache.capacity and torch.equal(block[0, i, :, :, 3:], new)
        assert torch.equal(block[1, i, :, :, 3:], -new)
    assert cache.block is block
    pool.give(cache.block)
    assert request_cache([], 5, **GEOMETRY, pool=pool).block.data_ptr() == block.data_ptr()


def test_writing_past_the_capacity_is_an_internal_error():
    cache = request_cache([states(2)], 2, **GEOMETRY)
    one = torch.zeros(1, HEADS, 1, DIM)
    with pytest.raises(AssertionError, match="overflow"):
        cache.layers[0].update(one, one)
    assert cache.get_seq_length() == 2


def test_batch_rows_and_states_views():
    prefix = states(2, seed=3)
    cache = request_cache([prefix], 4, **GEOMETRY, batch=2)
    rows = torch.stack([torch.full((HEADS, 2, DIM), 1.0), torch.full((HEADS, 2, DIM), 2.0)])  # [2, h, 2, d]
    for layer in cache.layers:
        layer.update(rows, -rows)
    pos = torch.arange(4)
    for r in range(2):
        got = cache.states((1, 2, 3, 4), pos, row=r)
        assert got.token_ids == (1, 2, 3, 4) and got.positions is pos
        for i in range(LAYERS):
            assert torch.equal(got.keys[i], torch.cat([prefix.keys[i], rows[r:r + 1]], dim=2))
            assert torch.equal(got.values[i], torch.cat([prefix.values[i], -rows[r:r + 1]], dim=2))
            assert got.keys[i].data_ptr() == cache.block[0, i, r].data_ptr()  # a view, not a copy
    assert len(cache.states((1,), pos[:1], row=1)) == 1


def test_states_of_another_geometry_are_refused():
    with pytest.raises(AssertionError, match="geometry"):
        request_cache([states(2)], 4, **(GEOMETRY | {"head_dim": DIM + 1}))
