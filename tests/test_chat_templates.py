"""Chats on tiny models carrying chat templates: the engine feeds exactly the template's ids
(`apply_chat_template(messages, add_generation_prompt=True)`), and its first-token logits equal a
plain transformers forward on them. Templates: those of tests/markup/test_chat.py (Llama 2, ChatML
with and without BOS == "<|im_start|>", Mistral, a default system prompt, Falcon).

Random tiny models have near-flat logits, so greedy tokens are compared with transformers'
`generate` on the real model (tests/real); here the logits are, with a tolerance."""

from __future__ import annotations

import pytest
import torch

import promptcache as pc
from promptcache.errors import PromptError
from promptcache.testing import tiny_model

from .markup.test_chat import CONVERSATIONS, FALCON_TEMPLATE, TEMPLATES, template_accepts

ALL = {**TEMPLATES, "falcon": FALCON_TEMPLATE}


def engine_with(name: str, arch: str = "llama"):
    extra = 2 if name == "smollm2" else 0
    model, tok = tiny_model(arch, vocab_size=1000 + extra)
    tok.chat_template = ALL[name]
    if extra:  # SmolLM2: BOS is the ChatML turn opener
        tok.add_special_tokens({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"})
        assert len(tok) == 1000 + extra
    return pc.Engine(model, tok, progress=False)


def transformers_logits(engine, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return engine.model(torch.tensor([ids])).logits[0, -1]


@pytest.mark.parametrize("name", sorted(ALL))
def test_chats_feed_the_templates_ids_and_answer_as_transformers(name):
    engine = engine_with(name)
    tok = engine.tokenizer
    checked = 0
    for messages in CONVERSATIONS:
        if not template_accepts(tok, messages):
            continue
        ids = list(tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))
        plan = engine.plan(messages)
        assert plan.token_ids == tuple(ids)
        with engine.prefill(plan) as pre:
            torch.testing.assert_close(pre.logits, transformers_logits(engine, ids), rtol=1e-4, atol=1e-4)
        checked += 1
    assert checked >= 2


def test_a_conversation_the_template_rejects_is_a_prompt_error():
    engine = engine_with("mistral")
    with pytest.raises(PromptError, match="chat template cannot render these messages.*system"):
        engine.generate(CONVERSATIONS[0], max_new_tokens=2)


def test_a_named_chat_format_replaces_the_template():
    model, tok = tiny_model("llama")
    tok.chat_template = TEMPLATES["chatml-default-system"]
    engine = pc.Engine(model, tok, progress=False, chat_format="llama2")
    text = tok.decode(engine.plan(CONVERSATIONS[4]).token_ids)
    assert "You are a helpful assistant" not in text and "[INST]" in text
