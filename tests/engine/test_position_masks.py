"""Position masks: new tokens that sit *before* spliced ones must not see them.

When a request computes tokens whose positions are lower than those of spliced states (a parameter's
argument, a cache="false" module, a module between root text), cache order is not position order,
and only a position mask keeps those tokens from attending to keys "from their future". Each case
below is exact by construction (no position gaps; every spliced state was encoded with exactly the
tokens the prompt has before it), so the oracle is the plain full prefill of the same tokens, and
the first-token logits must match it on every architecture.
"""

from __future__ import annotations

import pytest
import torch

from promptcache.markup.layout import encode_text

SCAFFOLD = "three or four"

CASES = {
    # An argument equal to the parameter's scaffold (so the module after it was encoded seeing
    # exactly these tokens), computed at positions below the spliced module "after".
    "parameter": ("""<schema name="m">You plan trips.
  <module name="trip">The trip lasts <parameter name="days" length="{n}" scaffold="{scaffold}"/> days.</module>
  <module name="after">The hotel is by the water and the city has a long history.</module>
</schema>""", f'<prompt schema="m"><trip days="{SCAFFOLD}"/><after/>How long is the trip?</prompt>'),
    # A module that is computed per request, before a spliced one.
    "cache_false": ("""<schema name="m">You answer questions.
  <module name="now" cache="false">Today is a rainy Monday in the city.</module>
  <module name="after">The hotel is by the water and the city has a long history.</module>
</schema>""", '<prompt schema="m"><now/><after/>What day is it?</prompt>'),
    # A computed module between two runs of the schema's own (spliced) text.
    "between_text": ("""<schema name="m">You answer questions.
  <module name="now" cache="false">Today is a rainy Monday in the city.</module>
  Answer in one short sentence, and say where the facts come from.
  <module name="after">The hotel is by the water and the city has a long history.</module>
</schema>""", '<prompt schema="m"><now/><after/>What day is it?</prompt>'),
}


def _schema(engine, case: str) -> str:
    schema, _ = CASES[case]
    return schema.format(n=len(encode_text(engine.tokenizer, SCAFFOLD)), scaffold=SCAFFOLD)


@pytest.mark.parametrize("case", sorted(CASES))
def test_tokens_before_spliced_states_match_the_full_prefill(engine, case):
    engine.add_schema(_schema(engine, case))
    prompt = CASES[case][1]
    plan = engine.plan(prompt)
    tokens = plan.tokens
    # The case really needs a mask: some computed token lies before some spliced token, and no gap.
    spliced = sorted(set(tokens.positions) - set(tokens.new_positions))
    assert tokens.new_positions and min(tokens.new_positions) < max(spliced)
    assert tokens.positions == tuple(range(len(tokens.token_ids))), "no gaps: the full prefill is the oracle"
    with engine.prefill(plan) as cached, engine.prefill(engine.plan(prompt, enable_cache=False)) as full:
        assert cached.cached_tokens > 0 and full.cached_tokens == 0
        torch.testing.assert_close(cached.logits, full.logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_output_matches_the_full_prefill(engine, case):
    engine.add_schema(_schema(engine, case))
    prompt = CASES[case][1]
    cached = engine.generate(prompt, max_new_tokens=8, ignore_eos=True)
    plain = engine.generate(prompt, max_new_tokens=8, ignore_eos=True, enable_cache=False)
    assert cached.token_ids == plain.token_ids
    assert cached.usage.cached_tokens > 0
