"""Chat formats: builtins, derivation from Jinja chat templates (exact, or a stated fallback), and
PML role blocks rendering as the template renders the same conversation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from promptcache.errors import PromptCacheError
from promptcache.markup.bind import bind
from promptcache.markup.chat import BUILTIN_FORMATS, ChatFormat, chat_format_for, render_messages
from promptcache.markup.layout import compile_schema
from promptcache.markup.parse import parse_prompt, parse_schema
from promptcache.markup.tokens import encode_markers
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

# SmolLM2-Instruct's own template (its bos_token is "<|im_start|>").
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
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

# Mistral-instruct v0.1 style: BOS once, no system role at all.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)

# Falcon-180B-chat style: turns are *separated* by newlines, so the first turn opens differently
# from the others, which per-role wrappers cannot express.
FALCON_TEMPLATE = (
    "{% for message in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{% if message['role'] == 'system' %}{{ 'System: ' }}{% elif message['role'] == 'user' %}{{ 'User: ' }}"
    "{% else %}{{ 'Falcon: ' }}{% endif %}{{ message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\nFalcon:' }}{% endif %}"
)

TEMPLATES = {"chatml": CHATML_TEMPLATE, "chatml-default-system": CHATML_DEFAULT_SYSTEM_TEMPLATE,
             "smollm2": SMOLLM2_TEMPLATE, "llama2": LLAMA2_TEMPLATE, "mistral": MISTRAL_TEMPLATE}

CONVERSATION = [
    {"role": "system", "content": "You plan trips."},
    {"role": "user", "content": "Three days in Rome?"},
    {"role": "assistant", "content": "Day 1: the Forum."},
    {"role": "user", "content": "And food?\nKeep it cheap & <short>."},
]
CONVERSATIONS = [CONVERSATION, CONVERSATION[:2], CONVERSATION[:3], CONVERSATION[1:], CONVERSATION[1:2]]


def tokenizer_with(template: str | None, bos: str | None = None):
    tok = tiny_tokenizer()
    tok.chat_template = template
    if bos is not None:  # e.g. SmolLM2, whose BOS is the ChatML turn opener
        tok.add_special_tokens({"bos_token": bos, "eos_token": "<|im_end|>"})
    return tok


def config(model_type: str) -> SimpleNamespace:
    return SimpleNamespace(model_type=model_type)


def template_accepts(tok, messages) -> bool:
    try:
        tok.apply_chat_template(messages, tokenize=False)
        return True
    except Exception:  # noqa: BLE001 - Jinja's raise_exception
        return False


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
    assert all(f.start is None and f.default_system == "" and f.template is None for f in BUILTIN_FORMATS.values())


def test_format_is_immutable_and_complete() -> None:
    fmt = BUILTIN_FORMATS["chatml"]
    with pytest.raises(TypeError):
        fmt.roles["user"] = ("", "")  # type: ignore[index]
    with pytest.raises(PromptCacheError, match="lacks role"):
        ChatFormat("broken", {"user": ("", "")})
    with pytest.raises(PromptCacheError, match="unknown chat role 'tool'"):
        fmt.wrap("tool", "x")


def test_derives_chatml_exactly() -> None:
    tok = tokenizer_with(CHATML_TEMPLATE)
    fmt = chat_format_for(tok, config("qwen2"))
    assert fmt.name == "derived:chatml" and fmt.template == CHATML_TEMPLATE  # named for its markers
    assert dict(fmt.roles) == dict(BUILTIN_FORMATS["chatml"].roles)
    assert fmt.generation_prompt == "<|im_start|>assistant\n"
    assert fmt.stop == ("<|im_end|>",)
    # The tokenizer adds <s> to plain text, but this template writes no BOS: a conversation starts bare.
    assert fmt.start == "" and fmt.default_system == ""


def test_bos_that_opens_every_turn_is_kept_in_every_turn() -> None:
    # Regression (SmolLM2): BOS == "<|im_start|>" was stripped from each prefix as if added later.
    tok = tokenizer_with(SMOLLM2_TEMPLATE, bos="<|im_start|>")
    fmt = chat_format_for(tok, config("llama"))
    assert dict(fmt.roles) == dict(BUILTIN_FORMATS["chatml"].roles)
    assert fmt.start == ""
    assert fmt.default_system == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
                                  "trained by Hugging Face<|im_end|>\n")


def test_default_system_prompt_is_kept() -> None:
    fmt = chat_format_for(tokenizer_with(CHATML_DEFAULT_SYSTEM_TEMPLATE), config("qwen2"))
    assert fmt.default_system == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert fmt.preamble("user") == fmt.default_system and fmt.preamble("system") == ""


def test_derives_llama2_with_the_system_prompt_inside_the_first_instruction() -> None:
    fmt = chat_format_for(tokenizer_with(LLAMA2_TEMPLATE), config("llama"))
    assert fmt.roles["user"] == ("<s>[INST] ", " [/INST]") and fmt.roles["assistant"] == (" ", " </s>")
    assert fmt.roles["system"] == ("<s>[INST] <<SYS>>\n", "\n<</SYS>>\n\n") and fmt.user_after_system == ""
    assert fmt.start == "" and fmt.generation_prompt == "" and fmt.stop == ()


def test_template_without_system_role_uses_user_wrapper() -> None:
    fmt = chat_format_for(tokenizer_with(MISTRAL_TEMPLATE), config("mistral"))
    assert fmt.roles["user"] == ("[INST] ", " [/INST]")
    assert fmt.roles["system"] == fmt.roles["user"]
    assert fmt.roles["assistant"] == ("", "</s>")
    assert fmt.start == "<s>"  # written once, before the first turn


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("turns", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_messages_equals_apply_chat_template(name: str, turns: int, add_generation_prompt: bool) -> None:
    tok = tokenizer_with(TEMPLATES[name], bos="<|im_start|>" if name == "smollm2" else None)
    fmt = chat_format_for(tok, config("llama"))
    assert fmt.template == TEMPLATES[name]
    messages = CONVERSATIONS[turns]
    if not template_accepts(tok, messages):
        pytest.skip(f"the {name} template rejects this conversation")
    expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert render_messages(fmt, messages, add_generation_prompt) == expected


@pytest.mark.parametrize("template", [
    FALCON_TEMPLATE,  # the first turn opens differently from the others
    # Content is transformed: the pieces around the (upper-case) probe markers look consistent,
    # but re-rendering other text shows they are not.
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] | upper + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}",
    "{% for m in messages %}{{ m['content'] }}{% endfor %}{{ messages[0]['content'] }}",
    "{% if messages|length > 1 %}{{ messages[-1]['content'] }}{% else %}x{% endif %}",
])
def test_template_not_expressible_turn_by_turn_still_renders_chats(template: str, caplog) -> None:
    fmt = chat_format_for(tokenizer_with(template), config("falcon"))
    builtin = BUILTIN_FORMATS["falcon"]
    assert fmt.name == "falcon+template" and fmt.template == template
    assert dict(fmt.roles) == dict(builtin.roles) and fmt.generation_prompt == builtin.generation_prompt
    assert "cannot be expressed turn by turn" in caplog.text


@pytest.mark.parametrize("template", ["{{ raise_exception('no chat here') }}", "{{ undefined_function() }}"])
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
    fmt = chat_format_for(tokenizer_with(CHATML_TEMPLATE), config("qwen2"), "falcon")
    assert fmt is BUILTIN_FORMATS["falcon"] and fmt.template is None


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


# ---- PML role blocks render as the template renders the same conversation ----------------------

def pml_ids(tok, fmt, schema_turns: list[dict], prompt_turns: list[dict]) -> tuple[int, ...]:
    """Token ids of a PML prompt: the schema holds `schema_turns`, the prompt `prompt_turns`."""
    def blocks(turns):
        return "".join(f"<{m['role']}>{m['content'].replace('&', '&amp;').replace('<', '&lt;')}</{m['role']}>"
                       for m in turns)
    layout = compile_schema(parse_schema(f'<schema name="c">{blocks(schema_turns)}</schema>'), tok, fmt)
    return bind(parse_prompt(f'<prompt schema="c">{blocks(prompt_turns)}</prompt>'), layout, tok).token_ids


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("turns", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("split", [1, -1])
def test_pml_role_blocks_render_as_the_template(name: str, turns: int, split: int) -> None:
    tok = tokenizer_with(TEMPLATES[name], bos="<|im_start|>" if name == "smollm2" else None)
    fmt = chat_format_for(tok, config("llama"))
    messages = CONVERSATIONS[turns]
    if not template_accepts(tok, messages) or (name == "mistral" and messages[0]["role"] == "system"):
        pytest.skip(f"the {name} template rejects this conversation")
    schema_turns, prompt_turns = messages[:split], messages[split:]
    if not schema_turns:
        pytest.skip("a schema without role blocks is plain text (documented)")
    whole = tok.apply_chat_template(messages, tokenize=False,
                                    add_generation_prompt=messages[-1]["role"] != "assistant")
    # The schema and the prompt are tokenized separately: cut the template's text where the schema
    # ends. (A template need not render the schema's turns alone: Llama 2 drops a lone system turn.)
    cut = len(render_messages(fmt, schema_turns, add_generation_prompt=False))
    expected = encode_markers(tok, whole[:cut]) + encode_markers(tok, whole[cut:])
    assert pml_ids(tok, fmt, schema_turns, prompt_turns) == expected


def test_a_user_block_after_a_user_block_or_text_keeps_its_opener() -> None:
    tok = tokenizer_with(SMOLLM2_TEMPLATE, bos="<|im_start|>")
    fmt = chat_format_for(tok, config("llama"))
    layout = compile_schema(parse_schema(
        '<schema name="c"><system>S</system>Docs:<module name="m">M</module><user>A</user><user>B</user>'
        '</schema>'), tok, fmt)
    expected = (encode_markers(tok, "<|im_start|>system\nS<|im_end|>\nDocs:") + encode_markers(tok, "M")
                + encode_markers(tok, "<|im_start|>user\nA<|im_end|>\n<|im_start|>user\nB<|im_end|>\n"))
    assert layout.passes[0].token_ids == expected
