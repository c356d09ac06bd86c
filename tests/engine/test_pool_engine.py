"""Request caches from the engine's buffer pool: reuse never changes results or leaks into stored states."""

from __future__ import annotations

import pytest

from promptcache.errors import PromptCacheError

from .conftest import ALL_DOCS_PROMPT, DOCS, make_engine

LONG = " ".join(["The city has a hotel by the water, and people talk about the long trip."] * 6)
REQUESTS = [
    ALL_DOCS_PROMPT,
    LONG,  # a big block first ...
    "Tell me about the hotel.",  # ... then a short request reuses it over stale states
    '<prompt schema="docs"><notes/>What is the answer?</prompt>',  # skips modules: a position gap
    [{"role": "user", "content": "Plan a trip to the city."}],
    LONG[:120],  # a prefix of an earlier prompt: spliced from the prefix tree
    ALL_DOCS_PROMPT,
]


def _run(engine, prompts, **kw):
    return [engine.generate(p, max_new_tokens=5, **kw).token_ids for p in prompts]


def test_pooled_equals_unpooled_and_uncached(arch):
    pooled, unpooled = make_engine(arch), make_engine(arch, pool_blocks=0)
    for e in (pooled, unpooled):
        e.add_schema(DOCS)
    got = _run(pooled, REQUESTS)
    assert got == _run(unpooled, REQUESTS)
    assert pooled.pool.hits >= len(REQUESTS) - 2 and unpooled.pool.hits == 0
    exact = [0, 1, 2, 4, 5, 6]  # prompts the maths says are exact (not the one skipping modules)
    assert [got[i] for i in exact] == _run(pooled, [REQUESTS[i] for i in exact], enable_cache=False)


def test_prefix_states_never_alias_a_pooled_block(arch):
    engine = make_engine(arch)
    first = engine.generate(LONG, max_new_tokens=4).token_ids
    for prompt in ("Something else entirely, about air and earth." * 3, LONG[:60]):
        engine.generate(prompt, max_new_tokens=4)  # overwrite the idle block with other states
    blocks = {b.untyped_storage().data_ptr() for b in engine.pool._idle}
    stored = [n.states for n in _nodes(engine.prefix) if n.states is not None]
    assert stored and not any(t.untyped_storage().data_ptr() in blocks for s in stored for t in s.keys)
    assert engine.generate(LONG, max_new_tokens=4).token_ids == first


def _nodes(tree):
    todo = list(tree._roots.values())
    while todo:
        node = todo.pop()
        yield node
        todo.extend(node.children.values())


def test_abandoned_stream_returns_its_block():
    engine = make_engine("llama")
    stream = engine.stream(LONG, max_new_tokens=8, ignore_eos=True)
    next(stream)
    assert engine.pool.idle_bytes == 0  # in use
    stream.close()
    assert engine.pool.idle_bytes > 0
    engine.generate(LONG, max_new_tokens=2)
    assert engine.pool.hits == 1


def test_pool_size_is_validated_and_defaults_on_cpu():
    assert make_engine("llama").pool.max_blocks == 4
    assert make_engine("llama", pool_blocks=1).pool.max_blocks == 1
    with pytest.raises(PromptCacheError, match="pool_blocks=-2: must be None or an int >= 0"):
        make_engine("llama", pool_blocks=-2)
