"""Every prompt is checked against the context window from its size before it is tokenized
(issue 27, finding 3: a 15 MB plain prompt was tokenized in full, 34 s, before being refused).

A prompt of more UTF-8 bytes than `MAX_BYTES_PER_TOKEN` times the window cannot fit whatever its
tokens: plain text, chat messages, PML free text and PML arguments are refused with a PromptError,
and the tokenizer is never asked. The engine keeps serving.
"""

from __future__ import annotations

import pytest

import promptcache as pc
from promptcache.engine.checks import MAX_BYTES_PER_TOKEN
from promptcache.errors import PromptError
from promptcache.markup.nodes import Prompt, Selection, Text

WINDOW = 256
TOO_BIG = MAX_BYTES_PER_TOKEN * WINDOW + 1  # bytes
SCHEMA = '<schema name="s">Be brief. <module name="m">Say <parameter name="p" length="8"/> now.</module></schema>'


class Calls:
    """Counts calls of the tokenizer's entry points the engine uses (`encode`, `apply_chat_template`)."""

    def __init__(self, monkeypatch, tokenizer):
        self.n = 0
        for name in ("encode", "apply_chat_template"):
            monkeypatch.setattr(tokenizer, name, self._counted(getattr(tokenizer, name)))

    def _counted(self, fn):
        def counted(*args, **kwargs):
            self.n += 1
            return fn(*args, **kwargs)
        return counted


@pytest.fixture
def engine() -> pc.Engine:
    model, tok = pc.testing.tiny_model("llama", max_positions=WINDOW)
    engine = pc.Engine(model, tok, progress=False)
    engine.add_schema(SCHEMA)
    return engine


PROMPTS = {
    "plain": "a" * TOO_BIG,
    "plain-multibyte": "\u00e9" * (TOO_BIG // 2 + 1),  # half as many characters as bytes
    "chat": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a" * TOO_BIG}],
    "chat-many-messages": [{"role": "user", "content": "a" * (TOO_BIG // 8 + 1)}] * 8,
    "pml-text": '<prompt schema="s"><m p="x"/>' + "a" * TOO_BIG + "</prompt>",
    "pml-argument": '<prompt schema="s"><m p="' + "a" * TOO_BIG + '"/></prompt>',
    "prompt-object-argument": Prompt("s", (Selection("m", (("p", "a" * TOO_BIG),)),)),
    "prompt-object-text": Prompt("s", (Selection("m", (("p", "x"),)),), (Text("a" * TOO_BIG),)),
}


@pytest.mark.parametrize("kind", PROMPTS)
def test_a_prompt_over_the_window_by_size_is_refused_before_tokenizing(engine, kind, monkeypatch):
    calls = Calls(monkeypatch, engine.tokenizer)
    with pytest.raises(PromptError, match=f"bytes of text: .*context window of {WINDOW}"):
        engine.generate(PROMPTS[kind], max_new_tokens=1)
    assert calls.n == 0, "the tokenizer was asked"
    monkeypatch.undo()
    assert engine.generate('<prompt schema="s"><m p="x"/>Go.</prompt>', max_new_tokens=2).token_ids


def test_a_prompt_within_the_size_bound_is_tokenized_and_judged_by_its_tokens(engine):
    with pytest.raises(PromptError, match="context window"):
        engine.generate("a b " * (MAX_BYTES_PER_TOKEN * WINDOW // 4), max_new_tokens=1)


def test_the_real_tokenizer_refuses_a_large_chat_before_its_template_runs(smollm2, monkeypatch):
    engine = pc.Engine(smollm2.model, smollm2.tokenizer, progress=False)
    window = engine.adapter.max_positions
    calls = Calls(monkeypatch, engine.tokenizer)
    big = "\U0001F31F" * (MAX_BYTES_PER_TOKEN * window // 4 + 1)
    with pytest.raises(PromptError, match=f"context window of {window}"):
        engine.generate([{"role": "user", "content": big}], max_new_tokens=1)
    assert calls.n == 0
