"""Stored module states sit at their layout positions and equal a plain transformers forward."""

from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import DynamicCache

from promptcache.markup.layout import ROOT

from .conftest import make_engine

# The scaffold is the longest member, so pass 0 and every member's pass have contiguous positions
# and a plain forward (index-based ALiBi for MPT) is a valid oracle.
SCHEMA = """
<schema name="pos">
  You answer questions about the documents below.
  <module name="intro">The first document talks about the city
    <module name="hotel">and its hotel</module>.</module>
  <union scaffold="long">
    <module name="short">Go by air.</module>
    <module name="long">Go by water, then by air, then walk the long way home to the city.</module>
  </union>
  <module name="trip">Plan a trip lasting <parameter name="days" length="3"/> days.</module>
  <module name="notes">The last document lists what people said about water.</module>
</schema>
"""

# Two unions after empty scaffolds fork at the same prefix but start at different positions.
EMPTY = """
<schema name="empty">
  Hello there.
  <union><module name="none"/><module name="full">Go by air now, please, with care.</module></union>
  <union><module name="no2"/><module name="other">Walk the long way.</module></union>
  <module name="b">More text.</module>
</schema>
"""


def plain_states(engine, token_ids, positions):
    """A plain transformers forward: the cache it fills (layers[i].keys: [1, kv_heads, seq, head_dim]).

    NOTE: a `DynamicCache` without the config keeps every key of every layer; built from a config with
    sliding-window layers (the model's default) it keeps only the last window's keys of those.
    """
    ids = torch.tensor([token_ids], dtype=torch.long)
    pos = torch.tensor([positions], dtype=torch.long)
    cache_arg = "cache" if "cache" in inspect.signature(engine.model.forward).parameters else "past_key_values"
    with torch.inference_mode():
        out = engine.model(input_ids=ids, position_ids=pos, use_cache=True, **{cache_arg: DynamicCache()})
    return out.past_key_values if out.past_key_values is not None else out.cache


def assert_states_match(stored, cache, index):
    for layer, (k, v) in enumerate(zip(stored.keys, stored.values, strict=True)):
        torch.testing.assert_close(k, cache.layers[layer].keys[:, :, index], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, cache.layers[layer].values[:, :, index], rtol=1e-5, atol=1e-5)


def test_pass_zero_modules_equal_a_plain_forward(engine):
    layout = engine.add_schema(SCHEMA)
    p0 = layout.passes[0]
    assert list(p0.positions) == list(range(len(p0.positions)))
    cache = plain_states(engine, p0.token_ids, p0.positions)
    owners = {o for o in p0.owners if o is not None}
    assert owners == {ROOT, "intro", "intro/hotel", "long", "trip", "notes"}
    for path in owners:
        stored = engine.module_states(layout.name, path)
        index = [i for i, o in enumerate(p0.owners) if o == path]
        assert stored.positions.tolist() == list(layout.module(path).positions)
        assert stored.positions.tolist() == [p0.positions[i] for i in index]
        assert stored.token_ids == layout.module(path).token_ids
        assert_states_match(stored, cache, index)


def test_a_non_scaffold_member_equals_a_forward_after_what_precedes_its_union(engine):
    layout = engine.add_schema(SCHEMA)
    p0 = layout.passes[0]
    short = layout.module("short")
    before = [i for i, q in enumerate(p0.positions) if q < short.start]
    token_ids = [p0.token_ids[i] for i in before] + list(short.token_ids)
    positions = [p0.positions[i] for i in before] + list(short.positions)
    assert positions == list(range(len(positions)))
    cache = plain_states(engine, token_ids, positions)
    stored = engine.module_states(layout.name, "short")
    assert stored.positions.tolist() == list(short.positions)
    assert_states_match(stored, cache, list(range(len(before), len(positions))))


def test_members_of_unions_after_empty_scaffolds_sit_at_their_own_positions():
    # RoPE: a key computed at the wrong position differs, so a plain forward at the right ones is
    # an oracle even though these positions have gaps. (Regression: such members were batched and
    # all run at the longest member's positions.)
    engine = make_engine("llama")
    layout = engine.add_schema(EMPTY)
    p0 = layout.passes[0]
    for path in ("full", "other"):
        mod = layout.module(path)
        before = [i for i, q in enumerate(p0.positions) if q < mod.start]
        token_ids = [p0.token_ids[i] for i in before] + list(mod.token_ids)
        positions = [p0.positions[i] for i in before] + list(mod.positions)
        cache = plain_states(engine, token_ids, positions)
        stored = engine.module_states(layout.name, path)
        assert stored.positions.tolist() == list(mod.positions)
        assert_states_match(stored, cache, list(range(len(before), len(positions))))


def test_an_empty_member_can_be_selected(engine):
    engine.add_schema(EMPTY)
    out = engine.generate('<prompt schema="empty"><none/><other/><b/>Go?</prompt>', max_new_tokens=3)
    assert "none" not in out.usage.modules_hit and "other" in out.usage.modules_hit
    assert out.usage.modules_written == ()
