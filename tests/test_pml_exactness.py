"""The README's exactness statement, on tiny models of every architecture: a prompt selecting every
module, each union's scaffold (by default its longest member) and each parameter's scaffold as
its argument feeds exactly what the schema was encoded with, so cached output equals the full
prefill token for token."""

from __future__ import annotations

import pytest

import promptcache as pc
from promptcache.testing import ARCHS, tiny_model

SCHEMA = """
<schema name="x">
  <system>You plan trips.</system>
  <user>
    <module name="intro">Plan a trip lasting <parameter name="days" length="4" scaffold="7"/> days
      for <parameter name="who" length="3"/>.</module>
    <union>
      <module name="short">Go by air.</module>
      <module name="long">Go by water, then by air, then walk the long way home to the city.</module>
    </union>
    <module name="live" cache="false">Today is <parameter name="day" length="6" scaffold="Monday"/>.</module>
    <module name="notes">Notes about the city and the water.</module>
  </user>
</schema>
"""

PROMPT = '<prompt schema="x"><intro days="7" who=""/><long/><live day="Monday"/><notes/><user>How?</user></prompt>'


@pytest.mark.parametrize("arch", ARCHS)
def test_selecting_every_scaffold_with_scaffold_arguments_is_exact(arch):
    model, tok = tiny_model(arch)
    engine = pc.Engine(model, tok, progress=False)
    layout = engine.add_schema(SCHEMA)
    assert layout.unions[0].scaffold == "long", "the default scaffold is the longest member"
    plan = engine.plan(PROMPT)
    assert plan.tokens.positions == tuple(range(len(plan.token_ids)))
    assert plan.tokens.next_position == len(plan.token_ids)
    cached = engine.generate(PROMPT, max_new_tokens=12, ignore_eos=True)
    full = engine.generate(PROMPT, max_new_tokens=12, ignore_eos=True, enable_cache=False)
    assert cached.usage.cached_tokens > 0 and "notes" in cached.usage.modules_hit
    assert cached.token_ids == full.token_ids
    assert len(set(cached.token_ids)) > 1, "degenerate model output makes the comparison meaningless"
