"""Automatic prefix reuse for plain prompts and chats: exact against the full prefill, counted right."""

from __future__ import annotations

import pytest

from promptcache.errors import PromptError
from promptcache.markup.nodes import ROLES

from .conftest import make_engine

PROMPT = "The first document talks about the city, its hotel and a long trip to the water."
SHARED = "The first document talks about the city, and then"
OTHER = "What people said about air and the earth"
CHAT = [{"role": "system", "content": "You answer questions about travel."},
        {"role": "user", "content": "Plan a trip to the city with a good hotel."}]
N = 6


def _exact(engine, prompt, **kw):
    cached = engine.generate(prompt, max_new_tokens=N, **kw)
    plain = engine.generate(prompt, max_new_tokens=N, enable_cache=False, **kw)
    assert cached.token_ids == plain.token_ids, (cached.token_ids, plain.token_ids)
    assert cached.text == plain.text
    return cached


def _ids(engine, prompt) -> tuple[int, ...]:
    return engine.plan(prompt).tokens.token_ids


def _common(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_repeat_and_partial_prefix_are_exact(engine):
    first = _exact(engine, PROMPT)
    assert first.usage.cached_tokens == 0
    assert len(set(first.token_ids)) > 1, "degenerate model output makes the comparison meaningless"
    second = _exact(engine, PROMPT)
    assert second.usage.input_tokens == first.usage.input_tokens
    assert second.usage.cached_tokens == second.usage.input_tokens - 1
    assert second.token_ids == first.token_ids
    shared = _common(_ids(engine, PROMPT), _ids(engine, SHARED))
    assert 1 < shared < len(_ids(engine, SHARED)) - 1
    third = _exact(engine, SHARED)
    assert third.usage.cached_tokens == shared


def test_cache_write_tokens(engine):
    first = engine.generate(PROMPT, max_new_tokens=N)
    assert first.usage.cache_write_tokens > 0
    assert engine.prefix.num_tokens >= first.usage.input_tokens
    again = engine.generate(PROMPT, max_new_tokens=N)
    assert again.usage.cache_write_tokens == 0


def test_cache_write_tokens_count_only_prompt_tokens(engine):
    """usage.py: cache_write_tokens are *prompt* tokens computed and stored by this request."""
    first = engine.generate(PROMPT, max_new_tokens=N, ignore_eos=True)
    assert first.usage.cache_write_tokens <= first.usage.input_tokens


def test_chat_messages_are_exact(engine):
    first = _exact(engine, CHAT)
    assert first.usage.cached_tokens == 0
    second = _exact(engine, CHAT)
    assert second.usage.cached_tokens == second.usage.input_tokens - 1
    longer = [*CHAT, {"role": "assistant", "content": first.text},
              {"role": "user", "content": "And the air?"}]
    third = _exact(engine, longer)
    assert third.usage.cached_tokens >= first.usage.input_tokens


def test_disabled_cache_reads_and_writes_nothing(engine):
    for _ in range(2):
        out = engine.generate(PROMPT, max_new_tokens=N, enable_cache=False)
        assert (out.usage.cached_tokens, out.usage.cache_write_tokens) == (0, 0)
    assert engine.prefix.num_tokens == 0 and len(engine.prefix) == 0


def test_namespaces_do_not_share(engine):
    a = engine.generate(PROMPT, max_new_tokens=N, namespace="a")
    b = engine.generate(PROMPT, max_new_tokens=N, namespace="b")
    assert b.usage.cached_tokens == 0 and b.usage.cache_write_tokens > 0
    assert b.token_ids == a.token_ids
    again = engine.generate(PROMPT, max_new_tokens=N, namespace="a")
    assert again.usage.cached_tokens == again.usage.input_tokens - 1
    assert engine.generate(PROMPT, max_new_tokens=N).usage.cached_tokens == 0  # default namespace ""


@pytest.mark.parametrize("messages, needles", [
    ([{"content": "hi"}], ["message 0", "role"]),
    ([{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}],
     ["message 1", "'robot'", *ROLES]),
    ([{"role": "user", "content": 3}], ["message 0", "content", "int"]),
    ([], ["empty"]),
    (["hello"], ["message 0", "role"]),
])
def test_bad_messages(messages, needles):
    engine = make_engine("llama")
    with pytest.raises(PromptError) as e:
        engine.generate(messages, max_new_tokens=2)
    for needle in needles:
        assert needle in str(e.value)


def test_small_budget_evicts_and_stays_exact(arch):
    probe = make_engine(arch)
    probe.generate(PROMPT, max_new_tokens=N)
    budget = probe.prefix.nbytes * 3 // 2
    engine = make_engine(arch, prefix_budget_bytes=budget)
    prompts = [PROMPT, OTHER, SHARED, PROMPT]
    for p in prompts:
        _exact(engine, p)
        assert engine.prefix.nbytes <= budget
    assert engine.prefix.num_tokens < sum(len(_ids(engine, p)) for p in prompts[:3])


def test_prefix_cache_off(arch):
    engine = make_engine(arch, prefix_cache=False)
    assert engine.prefix is None
    _exact(engine, PROMPT)
    out = engine.generate(PROMPT, max_new_tokens=N)
    assert (out.usage.cached_tokens, out.usage.cache_write_tokens) == (0, 0)
