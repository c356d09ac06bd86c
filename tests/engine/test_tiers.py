"""Memory tiers: budgets decide where module states live, never what a prompt outputs."""

from __future__ import annotations

import pytest
import torch

from promptcache.errors import StoreError
from promptcache.kv.states import KVStates
from promptcache.kv.store import ModuleStore

from .conftest import ALL_DOCS_PROMPT, DOCS, make_engine

N_MODULES = 4  # root, intro, code, notes


def run(engine):
    engine.add_schema(DOCS)
    return engine.generate(ALL_DOCS_PROMPT, max_new_tokens=10)


def test_budgets_place_modules_and_never_change_outputs(arch):
    reference = make_engine(arch)
    expected = run(reference)
    assert reference.store.stats()["device_modules"] == N_MODULES
    assert reference.store.stats()["host_modules"] == 0
    sizes = [reference.store.get(k).nbytes for k in reference.store.keys()]

    all_host = make_engine(arch, device_budget_bytes=0)
    assert run(all_host).token_ids == expected.token_ids
    stats = all_host.store.stats()
    assert (stats["device_modules"], stats["host_modules"]) == (0, N_MODULES)
    assert stats["host_bytes"] == sum(sizes)

    split = make_engine(arch, device_budget_bytes=max(sizes))
    assert run(split).token_ids == expected.token_ids
    stats = split.store.stats()
    assert stats["device_modules"] >= 1 and stats["host_modules"] >= 1
    assert stats["device_modules"] + stats["host_modules"] == N_MODULES
    assert stats["device_bytes"] <= max(sizes)


def test_dropped_modules_are_re_encoded_with_the_same_output(arch):
    expected = run(make_engine(arch))
    engine = make_engine(arch, device_budget_bytes=0, host_budget_bytes=1)
    engine.add_schema(DOCS)
    # Every put drops what the host tier held before: only the last module encoded survives.
    assert engine.store.stats()["host_modules"] == 1
    out = engine.generate(ALL_DOCS_PROMPT, max_new_tokens=10)
    assert out.token_ids == expected.token_ids
    assert out.usage.modules_written and out.usage.cache_write_tokens > 0
    assert set(out.usage.modules_written) | set(out.usage.modules_hit) == {"", "intro", "code", "notes"}
    assert out.usage.cached_tokens == expected.usage.cached_tokens
    again = engine.generate(ALL_DOCS_PROMPT, max_new_tokens=10)
    assert again.token_ids == expected.token_ids and again.usage.modules_written


# ---- eviction order, on the store itself ---------------------------------------------------------

UNIT = 16  # bytes of one token's states below: keys + values, 1 layer, 1 head, head_dim 2, float32


def states(n: int = 1) -> KVStates:
    # k, v: [1, kv_heads=1, n, head_dim=2]
    return KVStates(tuple(range(n)), torch.arange(n), (torch.zeros(1, 1, n, 2),), (torch.ones(1, 1, n, 2),))


def test_state_size_unit():
    assert states(3).nbytes == 3 * UNIT


def test_lru_demotion_then_drop_order_is_exact():
    store = ModuleStore("cpu", device_budget=3 * UNIT, host_budget=2 * UNIT)
    for key in "abc":
        assert store.put(key, states()) == "device"
    store.get("a")                                   # device LRU order: b, c, a
    assert store.put("d", states()) == "device"      # demotes b
    assert store.keys("device") == ["c", "a", "d"] and store.keys("host") == ["b"]
    assert store.put("e", states()) == "device"      # demotes c
    assert store.keys("host") == ["b", "c"]
    store.get("b")                                   # host LRU order: c, b
    assert store.put("f", states()) == "device"      # demotes a; the full host tier drops c
    assert store.keys("device") == ["d", "e", "f"]
    assert store.keys("host") == ["b", "a"]
    assert "c" not in store and store.get("c") is None
    store.pin("d")
    store.put("g", states())                         # d is pinned: e is demoted, host drops b
    assert store.keys("device") == ["d", "f", "g"] and store.keys("host") == ["a", "e"]
    assert store.tier_of("d") == "device" and store.tier_of("b") is None


def test_too_big_for_the_device_goes_to_the_host_and_is_still_kept():
    store = ModuleStore("cpu", device_budget=2 * UNIT, host_budget=2 * UNIT)
    store.put("small", states())
    assert store.put("big", states(5)) == "host"
    assert store.keys("device") == ["small"] and store.keys("host") == ["big"]
    assert torch.equal(store.get("big").values[0], torch.ones(1, 1, 5, 2))


def test_replacing_a_key_frees_its_old_bytes():
    store = ModuleStore("cpu", device_budget=2 * UNIT)
    store.put("a", states())
    store.put("a", states(2))
    stats = store.stats()
    assert (stats["device_modules"], stats["device_bytes"], stats["host_bytes"]) == (1, 2 * UNIT, 0)


def test_idle_entries_expire():
    now = [0.0]
    store = ModuleStore("cpu", ttl_s=10, clock=lambda: now[0])
    store.put("a", states())
    now[0] = 5.0
    store.put("b", states())
    now[0] = 12.0
    assert store.get("a") is None and store.get("b") is not None


@pytest.mark.parametrize("budget", [-1, 1.5, "10"])
def test_bad_budgets_are_refused(budget):
    with pytest.raises(StoreError, match="device_budget"):
        ModuleStore("cpu", device_budget=budget)
