"""ModuleStore: pins and unpins across tiers, and no pointless demotion when pins block the device tier.

The LRU demotion/drop order itself is asserted in tests/engine/test_tiers.py.
"""

from __future__ import annotations

import pytest
import torch

from promptcache.errors import StoreError
from promptcache.kv.states import KVStates
from promptcache.kv.store import ModuleStore

UNIT = 16  # bytes of one token's states below: keys + values, 1 layer, 1 head, head_dim 2, float32


def states(n: int = 1) -> KVStates:
    # k, v: [1, kv_heads=1, n, head_dim=2]
    return KVStates(tuple(range(n)), torch.arange(n), (torch.zeros(1, 1, n, 2),), (torch.ones(1, 1, n, 2),))


def test_unpin_makes_a_device_entry_demotable_again():
    store = ModuleStore("cpu", device_budget=2 * UNIT, host_budget=4 * UNIT)
    store.put("a", states())
    store.pin("a")
    store.put("b", states())
    store.put("c", states())  # a is pinned, though least recently used: b is demoted
    assert store.keys("device") == ["a", "c"] and store.keys("host") == ["b"]
    store.unpin("a")
    store.put("d", states())  # a is an ordinary LRU entry again
    assert store.keys("device") == ["c", "d"] and store.keys("host") == ["b", "a"]


def test_unpin_makes_a_host_entry_droppable_again():
    store = ModuleStore("cpu", device_budget=0, host_budget=2 * UNIT)
    for key in "ab":
        assert store.put(key, states()) == "host"
    store.pin("a")
    store.put("c", states())  # a is pinned: b is dropped
    assert store.keys("host") == ["a", "c"]
    store.unpin("a")
    store.put("d", states())
    assert store.keys("host") == ["c", "d"] and "a" not in store


def test_unpin_of_an_unknown_key_is_harmless_and_pin_is_not():
    store = ModuleStore("cpu")
    store.unpin("missing")
    with pytest.raises(StoreError, match="missing"):
        store.pin("missing")


def test_pins_that_block_the_device_tier_demote_nothing():
    store = ModuleStore("cpu", device_budget=3 * UNIT)
    for key in "abc":
        store.put(key, states())
    store.pin("a")
    store.pin("b")
    # 2 units needed, only c's 1 can be freed: demoting c would not make room, so c stays.
    assert store.put("d", states(2)) == "host"
    assert store.keys("device") == ["a", "b", "c"] and store.keys("host") == ["d"]
