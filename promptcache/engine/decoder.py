"""`Decoder`: one request's generation, a token per `step()`, over its prefilled cache.

The decoder owns what changes while a request generates: the position of each token it feeds,
the sampling state (its own RNG), the stop conditions (EOS and stop ids, stop strings) and the
budget left. A step picks a token from the current logits; the next step first feeds that token
through the model (so the last token is never fed for nothing). The two halves are separate
(`pending()` / `advance(logits)`) so that a scheduler can feed many requests' pending tokens in one
batched forward later; `step()` does both for one request.
"""

from __future__ import annotations

import torch

from .generate import SamplingParams, TextTracker, TokenPicker
from .prefill import Prefill


class Decoder:
    """Generates up to `prefill.budget` tokens after a prefilled prompt.

    Args:
        adapter: the model adapter that runs forwards.
        tokenizer: turns ids into text (stop strings, streaming deltas).
        prefill: the request's prefilled cache and first logits; the decoder writes into it.
        params: sampling parameters (`max_new_tokens` is already folded into `prefill.budget`).
        prompt_ids: every prompt token (the repetition penalty looks at them).
        stop_ids: token ids that end generation (EOS unless `params.ignore_eos`, plus stop_token_ids).
        stop: stop strings (the request's and the chat format's).
    """

    def __init__(self, adapter, tokenizer, prefill: Prefill, params: SamplingParams, prompt_ids, stop_ids,
                 stop: tuple[str, ...] = ()):
        self.adapter, self.pre = adapter, prefill
        self.budget = prefill.budget
        self.stop_ids = frozenset(stop_ids)
        self.picker = TokenPicker(params, adapter.device)
        self.tracker = TextTracker(tokenizer, stop)
        self.history = torch.empty((1, len(prompt_ids) + self.budget), dtype=torch.long, device=adapter.device)
        self.history[0, : len(prompt_ids)] = torch.tensor(list(prompt_ids), dtype=torch.long)
        self.n_history = len(prompt_ids)
        self.fed = prefill.length              # keys in the cache
        self.position = prefill.next_position  # where the next fed token goes
        self.logits: torch.Tensor | None = prefill.logits
        self.finish_reason: str | None = None
        self._pending: int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def token_ids(self) -> list[int]:
        """Generated tokens so far (a token that ended generation as EOS is not among them)."""
        return self.tracker.ids

    @property
    def text(self) -> str:
        return self.tracker.text

    @property
    def stop_string(self) -> str | None:
        """The stop string that ended generation (None: EOS, a stop id, the budget, or still going)."""
        return self.tracker.stop_string if self.finish_reason == "stop" else None

    def pending(self) -> tuple[int, int] | None:
        """(token, position) to feed before the next pick, or None."""
        return None if self._pending is None else (self._pending, self.position)

    def advance(self, logits: torch.Tensor) -> None:
        """Take the logits [vocab] of the pending token, fed by the caller at `pending()`'s position."""
        if self.pre.token_ids is not None:
            self.pre.token_ids.append(self._pending)  # its state is in the cache's next slot now
        self._pending, self.logits = None, logits
        self.fed += 1
        self.position += 1

    def feed_pending(self) -> None:
        """Run the pending token through the model (one request, one token)."""
        token, pos = self.pending()
        self.reserve()
        self.advance(self.adapter.decode(token, pos, self.pre.cache, self.pre.key_positions, self.fed))

    def reserve(self) -> None:
        """Make room in the cache for the pending token (the cache grows as tokens are generated)."""
        self.pre.cache.reserve(self.fed + 1)

    def step(self) -> int | None:
        """Generate one token; None when generation ended without one (EOS, stop id, no budget)."""
        if self.finished:
            return None
        if self._pending is not None:
            self.feed_pending()
        if len(self.tracker.ids) >= self.budget:
            self._finish("length")
            return None
        token = self.picker(self.logits, self.history[:, : self.n_history])
        self.history[0, self.n_history] = token
        self.n_history += 1
        if token in self.stop_ids:
            self._finish("stop")
            return None
        self.tracker.add(token)
        if self.tracker.stopped:
            self._finish("stop")
        elif len(self.tracker.ids) >= self.budget:
            self._finish("length")
        else:
            self._pending = token
        return token

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        self.tracker.finish()

    def delta(self) -> str:
        """New text safe to stream (all that is left once finished)."""
        return self.tracker.delta(final=self.finished)
