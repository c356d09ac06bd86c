"""Argument checks for the engine's constructor and requests: a PromptError naming the culprit.

NOTE: numpy scalars pass where Python numbers are meant (they are `numbers.Integral`/`Real`) and
come out as Python numbers; bool never passes for a number.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence

from ..errors import PromptError
from ..markup.nodes import Selection, Text

MAX_BYTES_PER_TOKEN = 256  # more text than any token holds: a bound checked before tokenizing


def optional_count(name: str, value: object) -> int | None:
    """None, or an int >= 0 (a byte budget, a number of blocks)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise PromptError(f"invalid {name}={value!r:.80}: must be None or an int >= 0")
    return int(value)


def optional_seconds(name: str, value: object) -> float | None:
    """None, or a finite number of seconds > 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise PromptError(f"invalid {name}={value!r:.80}: must be None or a finite number of seconds > 0")
    return float(value)


def flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise PromptError(f"invalid {name}={value!r:.80}: must be True or False")
    return value


def optional_dir(name: str, value: object) -> str | os.PathLike | None:
    """None, or a non-empty path without NUL characters."""
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise PromptError(f"invalid {name}={value!r:.80}: must be a directory path (str or os.PathLike)")
    text = os.fspath(value)
    if isinstance(text, bytes) or not text or "\0" in text:
        raise PromptError(f"invalid {name}={value!r:.80}: must be a non-empty path without NUL characters")
    return value


def text(what: str, value: str) -> str:
    """A prompt text: not empty, and encodable (a lone surrogate is not text)."""
    if value == "":
        raise PromptError(f"{what} is empty; give some text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PromptError(f"{what} holds a lone surrogate {value[e.start]!r} at index {e.start}: not valid "
                          "Unicode text (decode your input with errors='replace' first)") from None
    return value


def prompt_texts(prompt: str | Sequence) -> None:
    """Every text of a plain prompt or of chat messages passes `text` (a message may be empty)."""
    if isinstance(prompt, str):
        text("the prompt", prompt)
        return
    for i, m in enumerate(prompt):
        content = m.get("content") if isinstance(m, Mapping) else None
        if isinstance(content, str) and content:
            text(f"message {i} content", content)


def text_bytes(item: object) -> int:
    """UTF-8 bytes of the text in a plain prompt, chat messages, or PML nodes (a `Schema`, a `Prompt`):
    every `Text`, argument value and message content, walked without recursion."""
    size, stack = 0, [item]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            size += len(node.encode("utf-8", "surrogatepass"))
        elif isinstance(node, Text):
            stack.append(node.text)
        elif isinstance(node, Mapping):  # a chat message
            stack.append(node.get("content"))
        elif isinstance(node, Selection):
            stack.extend(v for _, v in node.args)
            stack.extend(node.children)
        elif isinstance(node, Sequence):  # the messages of a chat
            stack.extend(node)
        else:  # Schema, Module, Union, RoleBlock, Prompt: their children, members, selections and tail
            for field in ("children", "members", "selections", "tail"):
                stack.extend(getattr(node, field, None) or ())
    return size


def fits_window(what: str, n_bytes: int, max_positions: int) -> None:
    """Refuse text that cannot fit the context window before any time is spent tokenizing it.

    Args:
        what: the culprit, for the message ("the prompt", "schema 'docs'").
        n_bytes: its UTF-8 bytes of text (`text_bytes`).
        max_positions: the model's context window.
    """
    if n_bytes > MAX_BYTES_PER_TOKEN * max_positions:
        raise PromptError(f"{what} holds {n_bytes} bytes of text: more than its tokens could be and still "
                          f"fit the model's context window of {max_positions} "
                          f"(at most {MAX_BYTES_PER_TOKEN} bytes a token)")
