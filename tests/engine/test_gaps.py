"""The position-gap oracle: a prompt that skips a module equals a plain forward that masks it out.

A prompt selecting A but not B puts its question after B's positions. A plain transformers
forward over [root, A, B, question] with contiguous positions and a 2D attention_mask that is 0
on B sees exactly the same keys at exactly the same distances. For RoPE that checks the rotation;
for MPT it checks that the ALiBi bias follows positions, not cache indices (in the engine's cache
the question directly follows A).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from promptcache.markup.layout import ROOT, encode_text

GAP = """
<schema name="gap">
  You answer questions about the documents below.
  <module name="a">The first document talks about the city, its hotel and a long trip.</module
  ><module name="b">The second document lists what people said about water, air and the earth.</module
  ><module name="c">Plan a trip lasting <parameter name="days" length="6"/></module>
</schema>
"""

QUESTION = "What is the answer?"


def plain_logits(engine, token_ids, mask) -> torch.Tensor:
    """Logits [seq, vocab] of a plain forward with a 2D padding mask and contiguous positions."""
    ids = torch.tensor([token_ids], dtype=torch.long)
    with torch.inference_mode():
        out = engine.model(input_ids=ids, attention_mask=torch.tensor([mask], dtype=torch.long),
                           position_ids=torch.arange(len(token_ids))[None], use_cache=False)
    return out.logits[0]


def masked(segments) -> tuple[list[int], list[int]]:
    """Concatenate (token_ids, visible) segments into ids and a 2D attention mask."""
    ids, mask = [], []
    for tokens, visible in segments:
        ids += tokens
        mask += [int(visible)] * len(tokens)
    return ids, mask


def first_logits(engine, prompt) -> torch.Tensor:
    with engine.prefill(engine.plan(prompt)) as pre:
        return pre.logits


def test_skipped_module_equals_masked_plain_forward(engine):
    layout = engine.add_schema(GAP)
    prompt = f'<prompt schema="gap"><a/>{QUESTION}</prompt>'
    plan = engine.plan(prompt).tokens
    root, a, b, c = (layout.module(p) for p in (ROOT, "a", "b", "c"))
    assert plan.new_positions[0] == layout.length > b.end, "the question sits after a gap"
    # The gap is b and c (c's slot included): present in the oracle, masked out.
    ids, mask = masked([(root.token_ids, 1), (a.token_ids, 1), (b.token_ids, 0),
                        (c.token_ids + c.slots["days"].filler, 0), (plan.new_token_ids, 1)])
    assert len(ids) == plan.next_position
    expected = plain_logits(engine, ids, mask)[-1]
    torch.testing.assert_close(first_logits(engine, prompt), expected, rtol=1e-4, atol=1e-4)


def test_gap_oracle_holds_while_decoding(engine):
    # A gap where b is skipped; c is computed, not cached, its argument padded to the slot's length.
    layout = engine.add_schema(GAP.replace('<module name="c">', '<module name="c" cache="false">'))
    prompt = f'<prompt schema="gap"><a/><c days="3"/>{QUESTION}</prompt>'
    root, a, b, c = (layout.module(p) for p in (ROOT, "a", "b", "c"))
    arg, question = encode_text(engine.tokenizer, "3"), encode_text(engine.tokenizer, QUESTION)
    unfilled = c.slots["days"].length - len(arg)
    assert unfilled > 0
    ids, mask = masked([(root.token_ids, 1), (a.token_ids, 1), (b.token_ids, 0), (c.token_ids, 1),
                        (arg, 1), (c.slots["days"].filler[:unfilled], 1), (question, 1)])
    assert len(ids) == engine.plan(prompt).tokens.next_position
    greedy = []
    for _ in range(6):
        token = int(plain_logits(engine, ids, mask)[-1].argmax())
        greedy.append(token)
        ids.append(token)
        mask.append(1)
    out = engine.generate(prompt, max_new_tokens=6, ignore_eos=True)
    assert out.token_ids == tuple(greedy)
    assert len(set(greedy)) > 1, "degenerate model output makes the comparison meaningless"


@pytest.mark.parametrize("arch", ["mpt"])
def test_mpt_without_position_aware_alibi_would_fail(engine):
    layout = engine.add_schema(GAP)
    prompt = f'<prompt schema="gap"><a/>{QUESTION}</prompt>'
    aware = first_logits(engine, prompt)
    # The model's own ALiBi counts cache indices: the question looks adjacent to a.
    engine.adapter.positions = lambda k_pos: contextlib.nullcontext()
    index_based = first_logits(engine, prompt)
    assert (aware - index_based).abs().max() > 1e-3
    assert layout.length > len(engine.plan(prompt).tokens.token_ids)
