"""The oracle: where the maths says cached equals uncached, outputs match token for token."""

from __future__ import annotations

import torch

from promptcache.engine import prefill

from .conftest import ALL_DOCS_PROMPT, DOCS, make_engine

UNION_LAST = """
<schema name="u">
  <system>You plan trips.</system>
  <module name="intro">Plan the trip for the city.</module>
  <union scaffold="short">
    <module name="short">Go by air.</module>
    <module name="long">Go by water, then by air, then walk the long way home to the city.</module>
  </union>
</schema>
"""

PARAM_LAST = """
<schema name="p">
  <module name="trip">Plan a trip for this many days: <parameter name="days" length="{n}"/></module>
</schema>
"""


def _same(engine, prompt, n=12):
    cached = engine.generate(prompt, max_new_tokens=n)
    plain = engine.generate(prompt, max_new_tokens=n, enable_cache=False)
    assert cached.token_ids == plain.token_ids, (cached.token_ids, plain.token_ids)
    assert cached.text == plain.text
    return cached, plain


def test_all_modules_in_order_is_exact(engine):
    engine.add_schema(DOCS)
    cached, plain = _same(engine, ALL_DOCS_PROMPT, n=20)
    assert cached.usage.input_tokens == plain.usage.input_tokens
    assert cached.usage.cached_tokens > 0 and plain.usage.cached_tokens == 0
    assert cached.usage.output_tokens == len(cached.token_ids) > 0
    assert len(set(cached.token_ids)) > 1, "degenerate model output makes the comparison meaningless"


def test_first_logits_match(engine):
    engine.add_schema(DOCS)
    plan = engine.plan(ALL_DOCS_PROMPT)
    assert plan.source == "modules" and plan.tokens.positions == tuple(range(len(plan.token_ids)))
    with engine.prefill(plan) as cached, engine.prefill(engine.plan(ALL_DOCS_PROMPT, enable_cache=False)) as full:
        assert cached.cached_tokens > 0 and full.cached_tokens == 0
        torch.testing.assert_close(cached.logits, full.logits, rtol=1e-4, atol=1e-4)


def test_chunked_encoding_is_exact(engine, monkeypatch):
    monkeypatch.setattr(prefill, "CHUNK", 7)
    engine.add_schema(DOCS)
    _same(engine, ALL_DOCS_PROMPT)


def test_longest_union_member_last_is_exact(engine):
    engine.add_schema(UNION_LAST)
    cached, _ = _same(engine, '<prompt schema="u"><intro/><long/><user>How?</user></prompt>')
    assert cached.usage.modules_hit == ("", "intro", "long")


def test_full_length_argument_last_is_exact(arch):
    # An argument that fills its slot, at the end of the schema: every cached token precedes it.
    engine = make_engine(arch)
    arg = "five long days"
    engine.add_schema(PARAM_LAST.format(n=len(engine.tokenizer.encode(arg, add_special_tokens=False))))
    cached, plain = _same(engine, f'<prompt schema="p"><trip days="{arg}"/> Go.</prompt>')
    assert cached.usage.cached_tokens < plain.usage.input_tokens


def test_cache_false_module_is_exact(arch):
    engine = make_engine(arch)
    engine.add_schema(DOCS.replace('<module name="code">', '<module name="code" cache="false">'))
    cached, _ = _same(engine, ALL_DOCS_PROMPT)
    assert "code" not in cached.usage.modules_hit


def test_second_engine_on_same_model_is_exact(arch):
    # Regression: MPT's ALiBi hooks are registered once per model; a second engine must drive them too.
    first = make_engine(arch)
    first.add_schema(DOCS)
    engine = make_engine(arch)
    engine.add_schema(DOCS.replace('<module name="code">', '<module name="code" cache="false">'))
    _same(engine, ALL_DOCS_PROMPT)
