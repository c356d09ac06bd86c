"""Chat formats: builtins, derivation from Jinja chat templates, fallbacks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from promptcache.errors import PromptCacheError
from promptcache.markup.chat import BUILTIN_FORMATS, ChatFormat, chat_format_for, render_messages
from promptcache.testing import tiny_tokenizer

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Qwen2.5 style: a default system prompt when the conversation has none.
CHATML_DEFAULT_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}" + CHATML_TEMPLATE
)

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

# Mistral-instruct v0.1 style: no system role at all.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)

CONVERSATION = [
    {"role": "system", "content": "You plan trips."},
    {"role": "user", "content": "Three days in Rome?"},
    {"role": "assistant", "content": "Day 1: the Forum."},
    {"role": "user", "content": "And food?\nKeep it cheap & <short>."},
]


def tokenizer_with(template: str | None):
    tok = tiny_tokenizer()
    tok.chat_template = template
    return tok


def config(model_type: str) -> SimpleNamespace:
    return SimpleNamespace(model_type=model_type)


@pytest.mark.parametrize(("name", "role", "expected"), [
    ("chatml", "system", "<|im_start|>system\nhi<|im_end|>\n"),
    ("chatml", "assistant", "<|im_start|>assistant\nhi<|im_end|>\n"),
    ("llama2", "user", "[INST] hi [/INST]"),
    ("llama2", "system", "<<SYS>>\nhi\n<</SYS>>\n\n"),
    ("llama2", "assistant", " hi </s><s>"),
    ("falcon", "user", "User: hi\n"),
    ("falcon", "system", "System: hi\n"),
    ("plain", "user", "hi\n"),
])
def test_builtins_wrap(name: str, role: str, expected: str) -> None:
    assert BUILTIN_FORMATS[name].wrap(role, "hi") == expected


def test_builtin_generation_prompts_and_stops() -> None:
    assert BUILTIN_FORMATS["chatml"].generation_prompt == "<|im_start|>assistant\n"
    assert BUILTIN_FORMATS["chatml"].stop == ("<|im_end|>",)
    assert BUILTIN_FORMATS["falcon"].generation_prompt == "Assistant:"
    assert BUILTIN_FORMATS["llama2"].generation_prompt == ""
    assert set(BUILTIN_FORMATS) == {"llama2", "falcon", "chatml", "plain"}


def test_format_is_immutable_and_complete() -> None:
    fmt = BUILTIN_FORMATS["chatml"]
    with pytest.raises(TypeError):
        fmt.roles["user"] = ("", "")  # type: ignore[index]
    with pytest.raises(PromptCacheError, match="lacks role"):
        ChatFormat("broken", {"user": ("", "")})
    with pytest.raises(PromptCacheError, match="unknown chat role 'tool'"):
        fmt.wrap("tool", "x")


def test_derives_chatml_exactly() -> None:
    fmt = chat_format_for(tokenizer_with(CHATML_TEMPLATE), config("qwen2"))
    assert fmt.name == "derived:qwen2"
    assert dict(fmt.roles) == dict(BUILTIN_FORMATS["chatml"].roles)
    assert fmt.generation_prompt == "<|im_start|>assistant\n"
    assert fmt.stop == ("<|im_end|>",)


def test_default_system_preamble_is_dropped() -> None:
    fmt = chat_format_for(tokenizer_with(CHATML_DEFAULT_SYSTEM_TEMPLATE), config("qwen2"))
    assert dict(fmt.roles) == dict(BUILTIN_FORMATS["chatml"].roles)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_messages_equals_apply_chat_template_chatml(add_generation_prompt: bool) -> None:
    tok = tokenizer_with(CHATML_TEMPLATE)
    fmt = chat_format_for(tok, config("mpt"))
    expected = tok.apply_chat_template(CONVERSATION, tokenize=False,
                                       add_generation_prompt=add_generation_prompt)
    assert render_messages(fmt, CONVERSATION, add_generation_prompt) == expected


def test_derives_llama2_with_merged_system() -> None:
    tok = tokenizer_with(LLAMA2_TEMPLATE)
    fmt = chat_format_for(tok, config("llama"))
    assert dict(fmt.roles) == dict(BUILTIN_FORMATS["llama2"].roles)
    assert fmt.generation_prompt == "" and fmt.stop == ()
    no_system = CONVERSATION[1:]
    expected = tok.apply_chat_template(no_system, tokenize=False, add_generation_prompt=True)
    assert expected.startswith(tok.bos_token)
    assert render_messages(fmt, no_system) == expected[len(tok.bos_token):]


def test_template_without_system_role_uses_user_wrapper() -> None:
    fmt = chat_format_for(tokenizer_with(MISTRAL_TEMPLATE), config("mistral"))
    assert fmt.roles["user"] == ("[INST] ", " [/INST]")
    assert fmt.roles["system"] == fmt.roles["user"]
    assert fmt.roles["assistant"] == ("", "</s>")


@pytest.mark.parametrize("template", [
    "{{ raise_exception('no chat here') }}",
    "{% for m in messages %}{{ m['content'] }}{% endfor %}{{ messages[0]['content'] }}",
    "{% if messages|length > 1 %}{{ messages[-1]['content'] }}{% else %}x{% endif %}",
    "{{ undefined_function() }}",
])
def test_broken_template_falls_back_to_model_type(template: str) -> None:
    assert chat_format_for(tokenizer_with(template), config("falcon")) is BUILTIN_FORMATS["falcon"]


@pytest.mark.parametrize(("model_type", "expected"), [
    ("llama", "llama2"), ("mistral", "llama2"), ("falcon", "falcon"), ("mpt", "chatml"),
    ("qwen2", "chatml"), ("gpt2", "plain"),
])
def test_no_template_picks_builtin_by_model_type(model_type: str, expected: str) -> None:
    assert chat_format_for(tiny_tokenizer(), config(model_type)).name == expected


def test_no_config_no_template_is_plain() -> None:
    assert chat_format_for(tiny_tokenizer()).name == "plain"


def test_name_overrides_template() -> None:
    assert chat_format_for(tokenizer_with(CHATML_TEMPLATE), config("qwen2"), "falcon").name == "falcon"


def test_unknown_name_lists_builtins() -> None:
    with pytest.raises(PromptCacheError, match="llama2, falcon, chatml, plain"):
        chat_format_for(tiny_tokenizer(), None, "vicuna")


def test_render_messages_validates() -> None:
    fmt = BUILTIN_FORMATS["llama2"]
    with pytest.raises(PromptCacheError, match="'role' and 'content'"):
        render_messages(fmt, [{"role": "user"}])
    with pytest.raises(PromptCacheError, match="unknown chat role"):
        render_messages(fmt, [{"role": "robot", "content": "x"}])


def test_special_token_strings_survive_tokenization() -> None:
    tok = tiny_tokenizer()
    ids = tok(BUILTIN_FORMATS["llama2"].wrap("assistant", "ok"), add_special_tokens=False).input_ids
    assert ids[-2:] == [tok.eos_token_id, tok.bos_token_id]
