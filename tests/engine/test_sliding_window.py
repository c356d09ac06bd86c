"""Sliding-window layers (tiny Gemma 3, an 8-position window): exact below and well past the window.

The oracle is a plain transformers forward over the whole text (the model's own masks, no cache):
at every decode step, the engine's logits (float32) equal its logits at that token. Where a PML
prompt leaves a gap, a window counts positions (models/adapter.py): the oracle is the forward over
the whole schema with the gap's tokens masked out, and it differs from the forward over the tokens
present (a window counted in tokens) once the window cuts something.
"""

from __future__ import annotations

import pytest
import torch

from promptcache.engine.generate import SamplingParams
from promptcache.markup.layout import ROOT
from promptcache.testing import TINY_WINDOW

from .conftest import make_engine
from .test_gaps import masked, plain_logits

N = 8  # decode steps compared
WORDS = ("the city has a hotel by the water and people talk about the long trip home while "
         "others write about air light and the old house near the port ").split()
CONTEXTS = {"below": 6, "4x": 4 * TINY_WINDOW, "8x": 8 * TINY_WINDOW}  # prompt tokens, about


def text_of(engine, tokens: int, offset: int = 0) -> str:
    """Words from WORDS (starting at `offset`) until the text is about `tokens` tokens long."""
    words: list[str] = []
    while len(engine.tokenizer(" ".join(words)).input_ids) < tokens:
        words.append(WORDS[(offset + len(words)) % len(WORDS)])
    return " ".join(words)


def step_logits(engine, prompt, n: int = N):
    """(generated ids, logits [n, vocab] each was picked from, prompt ids, cached prompt tokens): greedy."""
    plan = engine.plan(prompt)
    with engine.prefill(plan, max_new_tokens=n) as pre:
        decoder = engine.decoder(plan, pre, SamplingParams(max_new_tokens=n, ignore_eos=True))
        logits = []
        while not decoder.finished:
            if decoder.pending() is not None:
                decoder.feed_pending()
            logits.append(decoder.logits.clone())
            decoder.step()
        cached = pre.cached_tokens
    return list(decoder.token_ids), torch.stack(logits[:n]), list(plan.token_ids), cached


def assert_matches_full_prefill(engine, prompt) -> int:
    """Every decode step's logits equal the plain forward's over the prompt and the tokens before it."""
    ids, logits, prompt_ids, cached = step_logits(engine, prompt)
    want = plain_logits(engine, prompt_ids + ids[:-1], [1] * (len(prompt_ids) + len(ids) - 1))
    torch.testing.assert_close(logits, want[len(prompt_ids) - 1:], rtol=1e-4, atol=1e-4)
    assert len(set(ids)) > 1, "degenerate model output makes the comparison meaningless"
    return cached


@pytest.fixture
def engine():
    return make_engine("gemma3")


@pytest.mark.parametrize("context", CONTEXTS)
def test_a_plain_prompt_and_its_extension_match_the_full_prefill(engine, context):
    prompt = text_of(engine, CONTEXTS[context])
    assert assert_matches_full_prefill(engine, prompt) == 0
    longer = prompt + " and then the hotel"
    assert assert_matches_full_prefill(engine, longer) >= len(engine.plan(prompt).token_ids) - 1  # reused


@pytest.mark.parametrize("context", CONTEXTS)
def test_a_chat_matches_the_full_prefill_turn_after_turn(engine, context):
    messages = [{"role": "user", "content": text_of(engine, CONTEXTS[context])}]
    assert_matches_full_prefill(engine, messages)
    reply = engine.generate(messages, max_new_tokens=N, ignore_eos=True).text
    turn = messages + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And the port?"}]
    assert assert_matches_full_prefill(engine, turn) > len(engine.plan(messages).token_ids) // 2


@pytest.mark.parametrize("context", CONTEXTS)
def test_a_pml_prompt_selecting_what_was_encoded_matches_the_full_prefill(engine, context):
    a, b = text_of(engine, CONTEXTS[context] // 2), text_of(engine, CONTEXTS[context] // 2, offset=7)
    engine.add_schema(f'<schema name="s">Notes.<module name="a">{a}</module><module name="b">{b}</module></schema>')
    prompt = '<prompt schema="s"><a/><b/>What now?</prompt>'
    assert engine.plan(prompt).tokens.positions == tuple(range(len(engine.plan(prompt).token_ids)))
    assert assert_matches_full_prefill(engine, prompt) > 0


def test_a_gap_counts_in_the_window_as_the_positions_it_spans(engine):
    a, b = text_of(engine, 3 * TINY_WINDOW), text_of(engine, 2 * TINY_WINDOW, offset=5)
    layout = engine.add_schema(f'<schema name="g">Notes.<module name="a">{a}</module>'
                               f'<module name="b">{b}</module></schema>')
    prompt = '<prompt schema="g"><a/>What now?</prompt>'
    root, ma, mb = (layout.module(p) for p in (ROOT, "a", "b"))
    question = engine.plan(prompt).tokens.new_token_ids
    with engine.prefill(engine.plan(prompt)) as pre:
        got = pre.logits
    # counted in positions: the whole schema, b masked out (the question's window holds b's positions)
    ids, mask = masked([(root.token_ids, 1), (ma.token_ids, 1), (mb.token_ids, 0), (question, 1)])
    torch.testing.assert_close(got, plain_logits(engine, ids, mask)[-1], rtol=1e-4, atol=1e-4)
    # counted in tokens: only the tokens present, at their positions; the window then reaches into a
    present = list(root.token_ids + ma.token_ids + question)
    positions = list(root.positions + ma.positions) + list(range(mb.end, mb.end + len(question)))
    with torch.inference_mode():
        by_tokens = engine.model(input_ids=torch.tensor([present]), position_ids=torch.tensor([positions]),
                                 use_cache=False).logits[0, -1]
    assert (got - by_tokens).abs().max() > 1e-3


def test_prefix_reuse_keeps_a_prefix_many_windows_long(engine):
    # Nothing is wiped or recomputed because the window moved on: a later prompt sharing a prefix of
    # several windows reads every shared token from the cache.
    prompt = text_of(engine, 8 * TINY_WINDOW)
    engine.generate(prompt, max_new_tokens=N, ignore_eos=True)
    ids = engine.plan(prompt).token_ids
    shared = text_of(engine, 5 * TINY_WINDOW)
    other = shared + " but the water was cold"
    common = next(i for i, (x, y) in enumerate(zip(ids, engine.plan(other).token_ids)) if x != y)
    assert common >= 5 * TINY_WINDOW - 2
    assert assert_matches_full_prefill(engine, other) == common
