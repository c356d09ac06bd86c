"""Plain prompts and chat messages: token ids at contiguous positions, for prefix reuse.

A chat is tokenized exactly as the model's own chat template renders it
(`tokenizer.apply_chat_template(messages, add_generation_prompt=True)`) whenever the engine's chat
format came from the tokenizer's template (`ChatFormat.template`): default system prompt, BOS and
all. A chat format chosen by name (or a template-less tokenizer) renders the messages turn by turn
instead: the format's preamble, then each role's prefix, content and suffix tokenized separately,
then the assistant's prefix, which opens the reply.

Either way the prefix tree reuses the longest common token prefix with earlier requests; with the
usual templates (each turn's text appended to the last) a conversation's tokens are a prefix of
its continuation's, so each turn reuses every earlier turn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..errors import PromptError
from ..markup.chat import ChatFormat
from ..markup.layout import PromptPlan
from ..markup.nodes import ROLES
from ..markup.tokens import Masks, encode_markers, encode_text, has_special


def check_messages(messages: Sequence) -> list[dict[str, str]]:
    """Validated copies of OpenAI-style `messages`; PromptError naming the bad message."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise PromptError(f"message {i} must be a mapping with 'role' and 'content', got {m!r:.80}")
        if m["role"] not in ROLES:
            raise PromptError(f"message {i} has role {m['role']!r}; valid roles: {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise PromptError(f"message {i} content must be a string, got {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    if not out:
        raise PromptError("messages is empty; give at least one {'role': 'user', 'content': ...}")
    return out


def chat_token_ids(messages: Sequence[Mapping[str, str]], tokenizer, chat: ChatFormat,
                   bos: tuple[int, ...]) -> list[int]:
    """The token ids of a chat, ending with the generation prompt (also after a final assistant
    message: the model then writes a new assistant turn, as vLLM's chat API does by default).

    Args:
        messages: validated messages (`check_messages`).
        tokenizer: the model's tokenizer.
        chat: the engine's chat format; with a `template`, the template renders the chat.
        bos: the tokenizer's leading BOS, used when `chat.start` is None (turn-by-turn formats).
    """
    if chat.template is not None:
        return _template_ids(messages, tokenizer, chat.template)
    ids = list(bos) if chat.start is None else []
    ids.extend(encode_markers(tokenizer, chat.preamble(messages[0]["role"])))
    after_system = False
    for m in messages:
        ids.extend(encode_markers(tokenizer, chat.opener(m["role"], after_system)))
        ids.extend(encode_text(tokenizer, m["content"]))
        ids.extend(encode_markers(tokenizer, chat.roles[m["role"]][1]))
        after_system = m["role"] == "system"
    ids.extend(encode_markers(tokenizer, chat.roles["assistant"][0]))
    return ids


def _template_ids(messages: Sequence[Mapping[str, str]], tokenizer, template: str) -> list[int]:
    """The template's ids; when a content holds a special token's string, that string is text
    (`markup.tokens`): contents are masked, rendered, and only the template's own special tokens
    are control ids."""
    masks = Masks(tokenizer) if any(has_special(tokenizer, m["content"]) for m in messages) else None
    if masks is not None:
        messages = [{**m, "content": masks.mask(m["content"])} for m in messages]
    try:
        out = tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=masks is None,
                                            add_generation_prompt=True, return_dict=False)
    except Exception as exc:  # noqa: BLE001 - Jinja raises anything (raise_exception, TemplateError)
        roles = ", ".join(m["role"] for m in messages)
        raise PromptError(f"the model's chat template cannot render these messages (roles: {roles}): "
                          f"{exc}") from exc
    ids = out if masks is None else masks.encode(out)
    return [int(i) for i in ids]


def plain_plan(prompt: str | Sequence, tokenizer, chat: ChatFormat, bos: tuple[int, ...]) -> PromptPlan:
    """A PromptPlan for a plain string or OpenAI-style messages: all tokens new, positions 0..n-1.

    `bos`: `markup.layout.leading_bos(tokenizer)`, computed once by the caller (it runs the tokenizer).
    """
    if isinstance(prompt, str):
        ids, stop = list(bos) + list(encode_text(tokenizer, prompt)), ()
    else:
        ids, stop = chat_token_ids(check_messages(prompt), tokenizer, chat, bos), chat.stop
    if not ids:
        raise PromptError("the prompt is empty")
    n = len(ids)
    return PromptPlan(schema="", modules=(), cached=(), new_token_ids=tuple(ids), new_positions=tuple(range(n)),
                      token_ids=tuple(ids), positions=tuple(range(n)), next_position=n, stop=stop)
