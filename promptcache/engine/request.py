"""`RequestPlan`: what a request will feed the model and where its states come from.

Made by `Engine.plan` before anything runs: a PML prompt is bound to the schema version current at
that moment (`source="modules"`), a plain prompt or chat is tokenized for prefix reuse
(`source="prefix"`), and `enable_cache=False` (or an engine without a prefix cache) computes
every token (`source="none"`). The plan fixes the context-window arithmetic once: `end` is the
position after the prompt, `room` how many tokens may follow it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import PromptError
from ..markup.layout import PromptPlan
from .modules import SchemaVersion

Source = Literal["modules", "prefix", "none"]


@dataclass(frozen=True)
class RequestPlan:
    """A planned request.

    Attributes:
        tokens: the prompt's tokens and positions (`markup.layout.PromptPlan`).
        source: "modules" (splice stored module states), "prefix" (reuse a cached prefix), "none".
        schema: for PML prompts, the schema version the prompt was bound to.
        namespace: the tenant whose prefixes (and response-cache entries) this request may reuse.
        end: the position after the prompt (gaps of skipped modules included when splicing).
        room: tokens that fit after the prompt in the model's context window (>= 1).
        retrieved: for PML prompts with `retrieve="k"`, the modules retrieval added (schema order).
    """

    tokens: PromptPlan
    source: Source
    schema: SchemaVersion | None
    namespace: str
    end: int
    room: int
    retrieved: tuple[str, ...] = ()

    @property
    def token_ids(self) -> tuple[int, ...]:
        """Every prompt token, in position order."""
        return self.tokens.token_ids

    @property
    def cached_modules(self) -> tuple[str, ...]:
        return self.tokens.cached if self.source == "modules" else ()

    def capacity(self, max_new_tokens: int) -> int:
        """Key slots a request cache needs: the prompt plus what may be generated."""
        return len(self.token_ids) + self.budget(max_new_tokens)

    def budget(self, max_new_tokens: int) -> int:
        """Tokens that may be generated: `max_new_tokens`, capped by the room left."""
        return min(max_new_tokens, self.room)


def make_plan(tokens: PromptPlan, source: Source, schema: SchemaVersion | None, namespace: str,
              max_positions: int, retrieved: tuple[str, ...] = ()) -> RequestPlan:
    """A RequestPlan; raises PromptError when the prompt leaves no room in the context window."""
    end = tokens.next_position if source == "modules" else len(tokens.token_ids)
    room = max_positions - end
    if room <= 0:
        raise PromptError(f"prompt needs {end} positions; the model's context window is {max_positions}")
    return RequestPlan(tokens, source, schema, namespace, end, room, retrieved)
