"""The engine's response cache: identical deterministic requests are answered from disk."""

from __future__ import annotations

import pytest

from .conftest import make_engine

PROMPT = "Plan a trip to the city with a good hotel."
N = 6


@pytest.fixture
def cached(arch, tmp_path):
    return make_engine(arch, response_cache_dir=tmp_path)


def _files(engine) -> int:
    return len(list(engine.responses.root.glob("*/*.json")))


def test_identical_greedy_request_is_served(cached):
    first = cached.generate(PROMPT, max_new_tokens=N)
    second = cached.generate(PROMPT, max_new_tokens=N)
    assert not first.usage.response_cached and second.usage.response_cached
    assert (second.text, second.token_ids, second.finish_reason) == (first.text, first.token_ids,
                                                                     first.finish_reason)
    u = second.usage
    assert u.cached_tokens == u.input_tokens == first.usage.input_tokens
    assert (u.cache_write_tokens, u.output_tokens) == (0, first.usage.output_tokens)


def test_chat_messages_are_served(cached):
    messages = [{"role": "user", "content": PROMPT}]
    first = cached.generate(messages, max_new_tokens=N)
    second = cached.generate([dict(messages[0])], max_new_tokens=N)
    assert second.usage.response_cached and second.token_ids == first.token_ids


def test_whitespace_differences_do_not_share_an_entry(cached):
    # Code differs in its whitespace: the key is the exact content (the tokens fed), never normalised.
    first = cached.generate("def f():\n    return 1", max_new_tokens=N)
    flat = cached.generate("def f(): return 1", max_new_tokens=N)
    assert not first.usage.response_cached and not flat.usage.response_cached
    assert _files(cached) == 2


def test_redefined_schema_is_not_served_the_old_answer(cached):
    schema = '<schema name="s"><module name="doc">{}</module></schema>'
    prompt = '<prompt schema="s"><doc/>What is it about?</prompt>'
    cached.add_schema(schema.format("The first document talks about the city and its hotel."))
    old = cached.generate(prompt, max_new_tokens=N)
    assert cached.generate(prompt, max_new_tokens=N).usage.response_cached
    cached.add_schema(schema.format("A list of what people said about water, air and the earth."))
    new = cached.generate(prompt, max_new_tokens=N)
    assert not new.usage.response_cached
    assert new.token_ids == cached.generate(prompt, max_new_tokens=N, enable_cache=False).token_ids
    assert new.token_ids != old.token_ids


def test_chat_format_is_part_of_the_key(arch, tmp_path):
    messages = [{"role": "user", "content": PROMPT}]
    first = make_engine(arch, response_cache_dir=tmp_path)
    first.generate(messages, max_new_tokens=N)
    # a format other than the model's default one (gemma3 has no template and no builtin: "plain")
    fmt = "chatml" if first.chat_format.name == "plain" else "plain"
    other = make_engine(arch, response_cache_dir=tmp_path, chat_format=fmt).generate(messages, max_new_tokens=N)
    assert not other.usage.response_cached


def test_sampling_without_seed_is_never_cached(tmp_path):
    engine = make_engine("llama", response_cache_dir=tmp_path)
    for _ in range(2):
        out = engine.generate(PROMPT, max_new_tokens=N, temperature=0.8)
        assert not out.usage.response_cached
    assert _files(engine) == 0
    seeded = [engine.generate(PROMPT, max_new_tokens=N, temperature=0.8, seed=7) for _ in range(2)]
    assert [s.usage.response_cached for s in seeded] == [False, True]
    assert seeded[0].token_ids == seeded[1].token_ids
    other_seed = engine.generate(PROMPT, max_new_tokens=N, temperature=0.8, seed=8)
    assert not other_seed.usage.response_cached


@pytest.mark.parametrize("change", [{"max_new_tokens": N + 1}, {"namespace": "b"}, {"stop": "x"},
                                    {"enable_cache": False}])
def test_different_settings_miss(change, tmp_path):
    engine = make_engine("llama", response_cache_dir=tmp_path)
    engine.generate(PROMPT, max_new_tokens=N)
    out = engine.generate(PROMPT, **{"max_new_tokens": N, **change})
    assert not out.usage.response_cached
    assert _files(engine) == 2


def test_off_by_default(engine):
    assert engine.responses is None
    for _ in range(2):
        assert not engine.generate(PROMPT, max_new_tokens=N).usage.response_cached
