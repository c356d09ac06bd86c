"""`AnswerMemory`: the token ids the engine generated for an answer's text, so that the next turn of a chat
sees the ids that were generated, not a re-tokenization of their text.

A reply's text re-tokenizes to other ids more often than not ("ALiBi" generated as `Al|i|Bi` is
tokenized `Ali|Bi`), and a stateless API (OpenAI, Anthropic, Bedrock) sends the whole conversation
back as text each turn. Without this, the prefix cache matches only up to the reply and recomputes
it; with it, a chat message list whose assistant turn is an answer this engine generated (same
text, same namespace) is tokenized with the generated ids there (`plain.chat_token_ids`), which is
what a stateful chat would have fed, and what the prefix tree holds.

Only ids that decode to exactly the text are remembered (an answer cut by a stop string, or holding
a control token, is not). Bounded: the least recently used entries go first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

DEFAULT_MAX_ANSWERS = 4096


class AnswerMemory:
    """Generated ids by (namespace, answer text), least recently used dropped beyond `max_entries`.

    Args:
        tokenizer: decodes ids to check that they spell the text.
        max_entries: answers kept (0: remember nothing).
    """

    def __init__(self, tokenizer, max_entries: int = DEFAULT_MAX_ANSWERS):
        self.tokenizer = tokenizer
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], tuple[int, ...]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def remember(self, namespace: str, text: str, token_ids: Sequence[int]) -> bool:
        """Keep `token_ids` as the ids of `text`; False (nothing kept) when they do not decode to exactly it."""
        ids = tuple(int(t) for t in token_ids)
        if not text or not ids or self.max_entries <= 0:
            return False
        decoded = self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if decoded != text:
            return False
        with self._lock:
            self._entries[(namespace, text)] = ids
            self._entries.move_to_end((namespace, text))
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return True

    def get(self, namespace: str, text: str) -> tuple[int, ...] | None:
        """The ids generated for `text` in `namespace`, or None."""
        with self._lock:
            ids = self._entries.get((namespace, text))
            if ids is not None:
                self._entries.move_to_end((namespace, text))
        return ids
