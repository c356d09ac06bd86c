"""Kept prefixes (`Engine.keep_prefix`, `engine.keep`): breakpoints to token offsets, states held in the
prefix tree for their TTL (refreshed on a hit), and the read/write/input split the cloud APIs report."""

from __future__ import annotations

import pytest

from promptcache.engine.keep import TTL_SECONDS, Breakpoint, CacheReport, Kept, PrefixKeeper, cache_report
from promptcache.errors import PromptError

from .conftest import make_engine

SYSTEM = "You answer questions about the weather in a long and careful way. " * 6
CHAT = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Will it rain?"}]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def engine():
    e = make_engine("llama")
    e.keeper = PrefixKeeper(e.prefix, clock=(clock := Clock()))
    e.clock = clock
    return e


def ids(engine, messages) -> list[int]:
    return list(engine.plan(messages).token_ids)


def test_a_breakpoint_is_the_token_offset_where_the_chat_cut_there_stops_agreeing(engine):
    engine.generate(CHAT, max_new_tokens=2)
    [kept] = engine.keep_prefix(CHAT, [Breakpoint(0, len(SYSTEM))])
    full, system_only = ids(engine, CHAT), ids(engine, CHAT[:1])
    common = next(i for i, (a, b) in enumerate(zip(full, system_only)) if a != b)
    assert kept.offset == common and kept.held == kept.offset and 0 < kept.offset < len(full)
    # the cut keeps the system turn's closing marker: the next turn starts after it
    assert full[: kept.offset] == system_only[: kept.offset]


def test_kept_states_outlive_eviction_until_their_ttl_then_go_first(engine):
    engine.generate(CHAT, max_new_tokens=2)
    [kept] = engine.keep_prefix(CHAT, [Breakpoint(0, len(SYSTEM), ttl_s=300.0)])
    prefix = ids(engine, CHAT)[: kept.offset]
    engine.prefix.evict(1 << 40)  # everything evictable goes
    with engine.prefix.match(prefix) as match:
        assert match.length == kept.offset  # held
    engine.clock.now = 299.0
    assert engine.keep_prefix(CHAT, [Breakpoint(0, len(SYSTEM), ttl_s=300.0)])[0].held == kept.offset  # a hit
    engine.clock.now = 500.0  # 201 s after the refresh: still kept
    engine.prefix.evict(1 << 40)
    with engine.prefix.match(prefix) as match:
        assert match.length == kept.offset
    engine.clock.now = 600.0
    assert [e.tokens for e in engine.keeper.entries()] == []  # expired: released
    engine.prefix.evict(1 << 40)
    with engine.prefix.match(prefix) as match:
        assert match.length == 0


def test_pin_unpin_and_release(engine):
    engine.generate(CHAT, max_new_tokens=2)
    engine.keep_prefix(CHAT, [Breakpoint(0, len(SYSTEM))])
    [entry] = engine.keeper.entries()
    assert not entry.pinned and entry.expires_in_s == TTL_SECONDS["5m"]
    assert engine.keeper.pin(entry.key).pinned
    engine.clock.now = 10_000.0
    assert engine.keeper.entries()[0].pinned
    unpinned = engine.keeper.pin(entry.key, pinned=False, ttl_s=60.0)
    assert not unpinned.pinned and unpinned.expires_in_s == 60.0
    engine.keeper.release(entry.key)
    assert engine.keeper.entries() == []
    with pytest.raises(PromptError, match="no kept prefix"):
        engine.keeper.release(entry.key)


def test_tenants_keep_and_read_only_their_own(engine):
    engine.generate(CHAT, max_new_tokens=2, namespace="a")
    assert engine.keep_prefix(CHAT, [Breakpoint(0, len(SYSTEM))], namespace="b")[0].held == 0
    assert engine.keep_prefix(CHAT, [Breakpoint(0, len(SYSTEM))], namespace="a")[0].held > 0


def test_without_a_prefix_cache_nothing_is_held():
    engine = make_engine("llama", prefix_cache=False)
    engine.generate(CHAT, max_new_tokens=2)
    assert engine.keep_prefix(CHAT, [Breakpoint(0, len(SYSTEM))])[0].held == 0


def test_a_breakpoint_outside_the_chat_is_a_prompt_error(engine):
    with pytest.raises(PromptError, match="outside the chat"):
        engine.keep_prefix(CHAT, [Breakpoint(5, 0)])
    with pytest.raises(PromptError, match="outside the chat"):
        engine.keep_prefix(CHAT, [Breakpoint(1, 1000)])


@pytest.mark.parametrize("read, kept, want", [
    (0, [], CacheReport(100, 0, {})),
    (40, [], CacheReport(100, 40, {})),
    (0, [Kept(30, 30, 300.0)], CacheReport(100, 0, {300.0: 30})),
    (0, [Kept(60, 60, 3600.0), Kept(30, 30, 300.0)], CacheReport(100, 0, {300.0: 30, 3600.0: 30})),
    (45, [Kept(30, 30, 300.0), Kept(60, 60, 3600.0)], CacheReport(100, 45, {3600.0: 15})),
    (0, [Kept(60, 20, 300.0)], CacheReport(100, 0, {300.0: 20})),  # only 20 tokens could be kept
    (99, [Kept(100, 100, 300.0)], CacheReport(100, 99, {300.0: 1})),
])
def test_cache_report_splits_the_prompt_and_sums_to_it(read, kept, want):
    got = cache_report(100, read, kept)
    assert got == want
    assert got.read_tokens + got.write_tokens + got.input_tokens == 100
