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

An assistant message whose text is an answer this engine generated (`answers.AnswerMemory`) is
tokenized as the ids that were generated, not re-tokenized: the tokens of a conversation are then
the tokens its earlier requests fed and generated, so the next turn's prefix match covers the
answer too. With a template, that needs the template to write the content verbatim, right after
the text it renders as the generation prompt and right before a control token (ChatML, Llama 3,
Mistral, ...); otherwise the message is tokenized as text, as before.

    rendered:  [head ........ <|im_start|>assistant\n][answer 1 text][<|im_end|>\n<|im_start|>user ...]
    ids:       tokenize(head)                          generated ids  tokenize(from the control token on)
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping, Sequence

from ..errors import PromptError
from ..markup.chat import ChatFormat
from ..markup.layout import PromptPlan
from ..markup.nodes import ROLES
from ..markup.tokens import Masks, encode_markers, encode_text, has_special, special_pattern

Answers = Callable[[str], "tuple[int, ...] | None"]  # an answer's text -> the ids generated for it, or None


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
                   bos: tuple[int, ...], answers: Answers | None = None) -> list[int]:
    """The token ids of a chat, ending with the generation prompt (also after a final assistant
    message: the model then writes a new assistant turn, as vLLM's chat API does by default).

    Args:
        messages: validated messages (`check_messages`).
        tokenizer: the model's tokenizer.
        chat: the engine's chat format; with a `template`, the template renders the chat.
        bos: the tokenizer's leading BOS, used when `chat.start` is None (turn-by-turn formats).
        answers: the ids generated for an assistant message's text, if any (`AnswerMemory.get`).
    """
    known = {} if answers is None else {i: ids for i, m in enumerate(messages)
                                        if m["role"] == "assistant" and (ids := answers(m["content"]))}
    if chat.template is not None:
        if known and (ids := _with_answers(messages, tokenizer, chat.template, known)) is not None:
            return ids
        return _template_ids(messages, tokenizer, chat.template)
    ids = list(bos) if chat.start is None else []
    ids.extend(encode_markers(tokenizer, chat.preamble(messages[0]["role"])))
    after_system = False
    for i, m in enumerate(messages):
        ids.extend(encode_markers(tokenizer, chat.opener(m["role"], after_system)))
        ids.extend(known[i] if i in known else encode_text(tokenizer, m["content"]))
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


def _with_answers(messages: Sequence[Mapping[str, str]], tokenizer, template: str,
                  known: dict[int, tuple[int, ...]]) -> list[int] | None:
    """The template's ids with the generated ids in place of the `known` assistant contents, or None
    when the template does not write each of them verbatim between its generation prompt and a
    control token (then the caller tokenizes the text)."""
    masks = Masks(tokenizer) if any(has_special(tokenizer, m["content"]) for m in messages) else None
    shown = [dict(m) for m in messages] if masks is None else \
        [{**m, "content": masks.mask(m["content"])} for m in messages]
    holes = {i: f"\ue004{secrets.token_hex(6)}:{i}\ue005" for i in known}
    with_holes = [{**m, "content": holes[i]} if i in holes else m for i, m in enumerate(shown)]
    full = _render(with_holes, tokenizer, template)
    pieces, at = [], 0  # the text between holes
    for i in sorted(known):
        hole_at = full.find(holes[i], at)
        if i == 0 or hole_at < 0 or _render(with_holes[:i], tokenizer, template) != full[:hole_at]:
            return None  # the answer is not right after the text its request was generated from
        pieces.append(full[at:hole_at])
        at = hole_at + len(holes[i])
    pieces.append(full[at:])
    contents = iter(shown[i]["content"] for i in sorted(known))
    if _render(shown, tokenizer, template) != "".join(p + next(contents, "") for p in pieces):
        return None  # the template changes the content (strips it, drops it)
    pattern = special_pattern(tokenizer)
    if pattern is None or not all(pattern.match(p) for p in pieces[1:]):
        return None  # the text after an answer must start at a control token, where tokenizing may cut it
    encode = masks.encode if masks is not None else (lambda text: encode_markers(tokenizer, text))
    ids = list(encode(pieces[0]))
    for i, piece in zip(sorted(known), pieces[1:], strict=True):
        ids.extend(known[i])
        ids.extend(encode(piece))
    return ids


def _render(messages: Sequence[Mapping[str, str]], tokenizer, template: str) -> str:
    try:
        return tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=False,
                                             add_generation_prompt=True, return_dict=False)
    except Exception as exc:  # noqa: BLE001 - Jinja raises anything (raise_exception, TemplateError)
        roles = ", ".join(m["role"] for m in messages)
        raise PromptError(f"the model's chat template cannot render these messages (roles: {roles}): "
                          f"{exc}") from exc


def plain_plan(prompt: str | Sequence, tokenizer, chat: ChatFormat, bos: tuple[int, ...],
               answers: Answers | None = None) -> PromptPlan:
    """A PromptPlan for a plain string or OpenAI-style messages: all tokens new, positions 0..n-1.

    `bos`: `markup.layout.leading_bos(tokenizer)`, computed once by the caller (it runs the tokenizer).
    `answers`: the ids this engine generated for an assistant message's text (`AnswerMemory`), if any.
    """
    if isinstance(prompt, str):
        ids, stop = list(bos) + list(encode_text(tokenizer, prompt)), ()
    else:
        ids, stop = chat_token_ids(check_messages(prompt), tokenizer, chat, bos, answers), chat.stop
    if not ids:
        raise PromptError("the prompt is empty")
    n = len(ids)
    return PromptPlan(schema="", modules=(), cached=(), new_token_ids=tuple(ids), new_positions=tuple(range(n)),
                      token_ids=tuple(ids), positions=tuple(range(n)), next_position=n, stop=stop)
