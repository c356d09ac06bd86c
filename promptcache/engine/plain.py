"""Plain prompts and chat messages: token ids at contiguous positions, for prefix reuse.

Chat messages are tokenized piece by piece (each role's prefix, content and suffix separately, then
the assistant prefix that opens the reply), so the tokens of a conversation are always a prefix
of the tokens of its continuation: every turn can reuse every earlier turn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..errors import PromptError
from ..markup.chat import ChatFormat
from ..markup.layout import PromptPlan, encode_text
from ..markup.nodes import ROLES


def check_messages(messages: Sequence) -> list[dict[str, str]]:
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
    ids = list(bos)
    for m in messages:
        before, after = chat.roles[m["role"]]
        for piece in (before, m["content"], after):
            ids.extend(encode_text(tokenizer, piece))
    if messages[-1]["role"] != "assistant":
        ids.extend(encode_text(tokenizer, chat.roles["assistant"][0]))
    return ids


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
