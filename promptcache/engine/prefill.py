"""Prefill: put a planned prompt's states into a fresh request cache and compute the rest.

Three ways, by the plan's source (see `request.RequestPlan`):

- "none": every prompt token, contiguous positions, one plain (chunked) prefill: the baseline.
- "prefix": splice the longest cached prefix of a plain prompt or chat, compute the rest.
- "modules": splice the selected modules' stored states, compute the new tokens at their positions.

Each returns a `Prefill`: the cache, the position of every key slot, how many are filled, the logits
that start the answer, and what was read from or written to a cache. The caller gives the cache's
block back with `Prefill.close()` (or a `with` block) when the request is done.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..kv.cache import RequestCache
from ..kv.states import KVStates
from .turns import chunk_size

CHUNK = 1024  # tokens per forward when prefilling a long run (bounds attention memory)


@dataclass
class Prefill:
    """A request's cache after its prompt ran, ready to decode.

    Attributes:
        cache: the request cache; `length` keys are filled, room for `budget` more.
        key_positions: [capacity] the position of every key slot (the first `length` are set).
        length: keys in the cache (prompt tokens whose states are there).
        next_position: where the first generated token goes.
        budget: tokens that may be generated: min(max_new_tokens, room left in the context).
        logits: [vocab] the logits of the prompt's last token (they pick the first output token).
        cached_tokens: prompt tokens whose states were read from a cache.
        written_tokens: prompt tokens whose states this request encoded and stored.
        modules_hit / modules_written: PML modules spliced from the store / (re-)encoded now.
        recomputed_tokens: spliced tokens whose stale states were recomputed (`engine.recompute`).
        exact: every filled slot holds the full prefill's state of its token at positions 0..length-1
            in slot order (a causal prefix state), so the prompt's states may go into the prefix tree.
            Set for prefix prefills, full prefills and PML prompts whose every stale state was
            recomputed with the gaps closed; not for PML splices, whose modules the store holds.
        token_ids: the token in every filled slot, in slot order, where the cache may stay warm for a
            later prompt with the same start (`kv.warm`, plain prompts); the decoder appends what it
            feeds. None elsewhere.
    """

    cache: RequestCache
    key_positions: torch.Tensor
    length: int
    next_position: int
    budget: int
    logits: torch.Tensor
    cached_tokens: int = 0
    written_tokens: int = 0
    modules_hit: tuple[str, ...] = ()
    modules_written: tuple[str, ...] = ()
    recomputed_tokens: int = 0
    exact: bool = False
    token_ids: list[int] | None = None
    release: Callable[[torch.Tensor], None] | None = field(default=None, repr=False)

    def close(self) -> None:
        """Give the cache's block back to the pool (idempotent). Nothing reads the cache after."""
        if self.release is not None:
            release, self.release = self.release, None
            release(self.cache.block)

    def __enter__(self) -> Prefill:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_chunks(adapter, ids: torch.Tensor, key_positions: torch.Tensor, start: int, cache,
               chunk: int | None = None, logits_to_keep: int = 1) -> torch.Tensor:
    """Run ids [batch, q] through `cache` in chunks; logits [batch, kept, vocab] of the last chunk.

    `cache` holds `start` keys; key_positions[:start + q] is the position of every key once all of
    `ids` ran (the queries' own positions are key_positions[start:start + q]).
    """
    logits, chunk, a = None, chunk or CHUNK, 0  # NOTE: CHUNK read at call time, so it can be changed
    while a < ids.shape[1]:
        b = min(a + chunk_size(chunk), ids.shape[1])  # a scheduler's turn may ask for a smaller chunk
        logits = adapter.forward(ids[:, a:b], key_positions[start + a:start + b], key_positions[:start + b],
                                 cache, logits_to_keep=logits_to_keep)
        a = b
    return logits


@dataclass(frozen=True)
class CacheSpec:
    """Where and how big a request cache is: what `prefill_*` need besides the tokens."""

    new_cache: Callable[[Sequence[KVStates], int], RequestCache]  # parts, capacity -> a pooled cache
    device: torch.device
    capacity: int


def prefill_full(adapter, spec: CacheSpec, token_ids: Sequence[int]) -> Prefill:
    """The baseline: every prompt token at contiguous positions, one plain prefill."""
    cache = spec.new_cache([], spec.capacity)
    k_pos = torch.arange(spec.capacity, dtype=torch.long, device=spec.device)
    ids = torch.tensor([list(token_ids)], dtype=torch.long, device=spec.device)
    logits = run_chunks(adapter, ids, k_pos, 0, cache)
    n = len(token_ids)
    return Prefill(cache, k_pos, n, n, spec.capacity - n, logits[0, -1], exact=True)


def prefill_prefix(adapter, spec: CacheSpec, token_ids: Sequence[int], prefix: Sequence[KVStates]) -> Prefill:
    """Plain prompts and chats: `prefix` (states of the first tokens, in order) spliced, the rest computed.

    The prompt's last token is always computed (its logits start the answer): pass a prefix shorter
    than the prompt.
    """
    cache = spec.new_cache(prefix, spec.capacity)
    use = len(cache.spliced_positions)
    assert use < len(token_ids), "the last prompt token must be computed"
    k_pos = torch.arange(spec.capacity, dtype=torch.long, device=spec.device)
    new = torch.tensor([list(token_ids[use:])], dtype=torch.long, device=spec.device)
    logits = run_chunks(adapter, new, k_pos, use, cache)
    n = len(token_ids)
    return Prefill(cache, k_pos, n, n, spec.capacity - n, logits[0, -1], cached_tokens=use, exact=True,
                   token_ids=list(token_ids))


def prefill_modules(adapter, spec: CacheSpec, parts: list[KVStates], new_ids: Sequence[int],
                    new_positions: Sequence[int], next_position: int, recompute=None) -> Prefill:
    """PML prompts: `parts` (stored module states) spliced, `new_ids` computed at `new_positions`.

    `recompute`: a `recompute.Blend` (stale states to repair, gaps to close) that runs instead.

    The prompt's last token (highest position) must be computed: its logits start the answer. It
    may sit inside a module (the root's text can follow a module); that part is split around it.
    """
    if recompute is not None:
        return recompute.prefill(adapter, spec, parts)
    parts, new_ids, new_positions = _compute_last_token(parts, list(new_ids), list(new_positions))
    cache = spec.new_cache(parts, spec.capacity)
    past = cache.spliced_positions
    n_cached, n_new = len(past), len(new_ids)
    # key slots: [cached parts' positions | new tokens' positions | decoded tokens' (set while decoding)]
    k_pos = torch.empty(spec.capacity, dtype=torch.long, device=spec.device)
    k_pos[:n_cached] = past
    k_pos[n_cached:n_cached + n_new] = torch.tensor(new_positions, dtype=torch.long)
    ids = torch.tensor([new_ids], dtype=torch.long, device=spec.device)
    logits = run_chunks(adapter, ids, k_pos, n_cached, cache)
    n = n_cached + n_new
    return Prefill(cache, k_pos, n, next_position, spec.capacity - n, logits[0, -1], cached_tokens=n_cached)


def _compute_last_token(parts: list[KVStates], new_ids: list[int], new_pos: list[int]):
    """Move the prompt's highest-position token from a stored part to the tokens to compute."""
    tops = [int(p.positions.max()) if len(p) else -1 for p in parts]
    if parts and (not new_pos or max(new_pos) < max(tops)):
        i = tops.index(max(tops))
        j = int(parts[i].positions.argmax())
        new_ids.append(parts[i].token_ids[j])
        new_pos.append(tops[i])
        parts = parts[:i] + [parts[i].slice(0, j), parts[i].slice(j + 1, len(parts[i]))] + parts[i + 1:]
    return [p for p in parts if len(p)], new_ids, new_pos
