"""Text is tokenized as text: only a chat format's own markers become control tokens.

A tokenizer parses its special tokens ("</s>", "<|im_end|>", ...) out of any string it is given,
so a user who writes "<|im_end|><|im_start|>system" inside a message would close their turn and
open a system turn. As the hosted APIs do, promptcache tokenizes user content, parameter
arguments, plain prompts and module text as text (the characters "</s>" spelled out) and only
the chat format's markers (role openers and closers, the template's own output around the
messages, the generation prompt) as control tokens.

Two paths give the same ids whenever no text contains a special token's string:

- plain: the joined string tokenized once, as the template path always was (exact with
  `apply_chat_template`);
- guarded (some text contains a special token's string): the string is cut at the markers'
  special tokens, each becomes its id, and the text between them is tokenized with
  `split_special_tokens=True`. Every string between two special tokens is a separate segment for
  the tokenizer in both paths, so for byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, SmolLM) the
  only difference is the spelled-out text. NOTE: a SentencePiece tokenizer that marks a word start
  on the first piece of a string ("▁") may add one to text right after a marker on this path.

Text pieces are given as `Piece(text, marker)`; a rendered string (a chat template's output) whose
contents may hold special tokens' strings is handled by masking those strings with private-use
placeholders before rendering (`Masks`).
"""

from __future__ import annotations

import functools
import re
import secrets
import threading
from collections.abc import Iterable
from typing import NamedTuple


class Piece(NamedTuple):
    text: str
    marker: bool  # a chat format's own text: its special tokens' strings are control tokens


def encode_text(tokenizer, text: str) -> tuple[int, ...]:
    """`text` as text: a special token's string in it is spelled out, never its control id."""
    return tuple(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)) if text else ()


def encode_markers(tokenizer, text: str) -> tuple[int, ...]:
    """A chat format's own text (role markers, preambles): special tokens' strings are control ids."""
    return tuple(tokenizer.encode(text, add_special_tokens=False)) if text else ()


@functools.lru_cache(maxsize=32)
def special_pattern(tokenizer) -> re.Pattern | None:
    """A regex matching the string of any special token the tokenizer parses out of text (longest
    first), or None when it has none."""
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    strings = {t.content for t in decoder.values() if getattr(t, "special", False) and t.content}
    strings |= {s for s in getattr(tokenizer, "all_special_tokens", ()) if s}
    if not strings:
        return None
    return re.compile("|".join(re.escape(s) for s in sorted(strings, key=len, reverse=True)))


def has_special(tokenizer, text: str) -> bool:
    """Does `text` contain a special token's string?"""
    pattern = special_pattern(tokenizer)
    return pattern is not None and pattern.search(text) is not None


def encode_pieces(tokenizer, pieces: Iterable[Piece]) -> tuple[int, ...]:
    """Markers and text joined, markers' special tokens as control ids, text as text."""
    pieces = [p for p in pieces if p.text]
    if not any(not p.marker and has_special(tokenizer, p.text) for p in pieces):
        return encode_markers(tokenizer, "".join(p.text for p in pieces))
    masks = Masks(tokenizer)
    return masks.encode("".join(p.text if p.marker else masks.mask(p.text) for p in pieces))


class Masks:
    """Private-use placeholders for the special tokens' strings inside text, so that a string can
    be rendered (by a chat template) and its markers told apart from its text afterwards."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pattern = special_pattern(tokenizer)
        self.nonce = secrets.token_hex(6)  # placeholders cannot collide with a user's text
        self.strings: list[str] = []
        self.placeholder = re.compile(f"\ue000{self.nonce}:(\\d+)\ue001")

    def mask(self, text: str) -> str:
        """`text` with each special token's string replaced by a placeholder."""
        if self.pattern is None:
            return text

        def sub(m: re.Match) -> str:
            self.strings.append(m.group(0))
            return f"\ue000{self.nonce}:{len(self.strings) - 1}\ue001"

        return self.pattern.sub(sub, text)

    def unmask(self, text: str) -> str:
        return self.placeholder.sub(lambda m: self.strings[int(m.group(1))], text)

    def encode(self, rendered: str) -> tuple[int, ...]:
        """Ids of `rendered` (masked text inside markers): the special tokens left in it are control
        ids; the text between them, unmasked, is tokenized as text, each stretch between two control
        tokens exactly as the tokenizer tokenizes a stretch between two special tokens."""
        if self.pattern is None:
            return encode_markers(self.tokenizer, rendered)
        guard = _guard(self.tokenizer)
        if guard is not None:
            markers = self.pattern.sub(lambda m: guard.placeholders.get(m.group(0), m.group(0)), rendered)
            return guard.encode(self.unmask(markers))
        ids: list[int] = []  # a tokenizer without a `tokenizers` backend: stretch by stretch
        at = 0
        for m in self.pattern.finditer(rendered):
            ids.extend(encode_text(self.tokenizer, self.unmask(rendered[at:m.start()])))
            ids.extend(encode_markers(self.tokenizer, m.group(0)))
            at = m.end()
        ids.extend(encode_text(self.tokenizer, self.unmask(rendered[at:])))
        return tuple(ids)


class _Guard:
    """A private copy of a `tokenizers` backend that spells every special token's string as text
    and knows one placeholder per special token instead (an added, non-special token with the same
    strip flags, so the text around it is cut exactly as around the special token)."""

    def __init__(self, backend, added: dict):
        from tokenizers import AddedToken, Tokenizer

        self.tokenizer = Tokenizer.from_str(backend.to_str())
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.tokenizer.encode_special_tokens = True
        nonce = secrets.token_hex(6)
        self.placeholders: dict[str, str] = {}
        self.ids: dict[int, int] = {}  # placeholder id -> the special token's id
        for n, (tid, tok) in enumerate(sorted(added.items())):
            placeholder = f"\ue002{nonce}:{n}\ue003"
            self.tokenizer.add_tokens([AddedToken(placeholder, special=False, normalized=False,
                                                  lstrip=tok.lstrip, rstrip=tok.rstrip,
                                                  single_word=tok.single_word)])
            self.placeholders[tok.content] = placeholder
            self.ids[self.tokenizer.token_to_id(placeholder)] = tid
        self.lock = threading.Lock()  # NOTE: a `tokenizers.Tokenizer` is not documented thread-safe

    def encode(self, text: str) -> tuple[int, ...]:
        with self.lock:
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return tuple(self.ids.get(i, i) for i in ids)


@functools.lru_cache(maxsize=32)
def _guard(tokenizer) -> _Guard | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    added = {tid: t for tid, t in decoder.items() if getattr(t, "special", False) and t.content}
    if backend is None or not added:
        return None
    return _Guard(backend, added)
