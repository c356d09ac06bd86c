"""Adding schemas is bounded by `module_budget_bytes`: issue 27, finding "any caller can grow the module
store without bound through add_schema"."""

from __future__ import annotations

import pytest

from promptcache.errors import PromptError

from .conftest import make_engine

SCHEMA = """<schema name="{name}">
  You answer questions about the documents below.
  <module name="a">The first document talks about the city, its hotel and a long trip by the sea.</module>
  <module name="b">The second document lists what people said about water, air and the earth.</module>
</schema>"""
PROMPT = '<prompt schema="{name}"><a/><b/>What is it about?</prompt>'


def schema_bytes(arch: str) -> int:
    """What one schema's module states take (every one is the same size)."""
    engine = make_engine(arch)
    engine.add_schema(SCHEMA.format(name="s0"))
    states = [engine.module_states("s0", p) for p in ("", "a", "b")]
    return sum(s.nbytes for s in states if s is not None)


def store_bytes(engine) -> int:
    stats = engine.modules.store.stats()
    return stats["device_bytes"] + stats["host_bytes"]


@pytest.mark.parametrize("arch", ["llama", "falcon", "mpt"])
def test_schemas_past_the_budget_are_refused_and_the_others_keep_serving(arch):
    one = schema_bytes(arch)
    engine = make_engine(arch, module_budget_bytes=3 * one)
    for i in range(3):
        engine.add_schema(SCHEMA.format(name=f"s{i}"))
    engine.add_schema(SCHEMA.format(name="s1"))  # a new version of one replaces it: nothing more needed
    answer = engine.generate(PROMPT.format(name="s1"), max_new_tokens=4).token_ids
    with pytest.raises(PromptError, match=rf"schema 's3' needs {one:,} bytes.*3 other schemas added "
                                          rf"\({3 * one:,} bytes\).*module_budget_bytes={3 * one:,}"):
        engine.add_schema(SCHEMA.format(name="s3"))
    assert sorted(engine.schemas) == ["s0", "s1", "s2"] and store_bytes(engine) <= 3 * one
    assert engine.generate(PROMPT.format(name="s1"), max_new_tokens=4).token_ids == answer
    engine.remove_schema("s0")
    engine.add_schema(SCHEMA.format(name="s3"))
    assert sorted(engine.schemas) == ["s1", "s2", "s3"] and store_bytes(engine) == 3 * one


def test_a_schema_larger_than_the_whole_budget_is_refused_before_encoding():
    one = schema_bytes("llama")
    engine = make_engine("llama", module_budget_bytes=one - 1)
    with pytest.raises(PromptError, match="module_budget_bytes"):
        engine.add_schema(SCHEMA.format(name="s0"))
    assert engine.schemas == {} and store_bytes(engine) == 0


@pytest.mark.parametrize("bad", [-1, 1.5, "1GB", True])
def test_a_bad_budget_is_refused_by_name(bad):
    with pytest.raises(PromptError, match="module_budget_bytes"):
        make_engine("llama", module_budget_bytes=bad)


def test_schemas_without_cached_modules_count_too():
    one = schema_bytes("llama")
    engine = make_engine("llama", module_budget_bytes=one)
    engine.add_schema(SCHEMA.format(name="s0").replace('name="a"', 'name="a" cache="false"')
                      .replace('name="b"', 'name="b" cache="false"'))
    with pytest.raises(PromptError, match="module_budget_bytes"):
        engine.add_schema('<schema name="empty"><module name="m" cache="false">x</module></schema>')
