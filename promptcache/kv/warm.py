"""Warm blocks: a request's cache block keeps what it holds, so the next request continues in place.

llama.cpp keeps a slot's cache after a request; for the next prompt it keeps the longest common
prefix and evaluates only the rest. Here a request's block goes back to the pool with a record of
its contents (`Contents`), and the next request that would splice the same states into its first
slots takes that block and copies only what differs (`kv.cache.request_cache(reuse=...)`). Two
kinds, by what makes a slot's state valid for another request:

    "prefix" (plain prompts, chats)      "modules" (PML)
    slot: 0  1  2  3  4  5  6 ...        slot: [ run A  ][  run B   ][ computed ... ]
          t0 t1 t2 t3 t4 t5 t6                 copy of stored A, B: the same tensors, in order
          each the state of t_i after t0..t_i-1 at positions 0..i (a causal prefix state)

- "prefix": any request of the same namespace whose prompt starts with t0..t(m-1) keeps slots
  [0, m): they hold exactly the states that its prefix match (or its own prefill) would put
  there. A namespace never sees another's block (the prefix tree's rule).
- "modules": a request whose spliced parts begin with the same stored states keeps those runs.
  Sameness is identity, not equality of token ids: the record holds the runs it copied (so their
  memory cannot be freed and reused by other states) and a part matches a run only if every
  layer's key and value tensor is a view of the same storage at the same offset, shape and stride.
  A module re-encoded (a new schema version, an eviction and re-encode, a load from disk) is a new
  tensor: its old copies are never reused. Slots after the runs (computed tokens) are never kept.

NOTE: slots below a cache's spliced count are never written after `request_cache` fills them (a
`SpliceLayer` only appends at its length, and no caller lowers a length below that count), so a
record made at release still describes them. A block is in the pool or in one request, never both:
the pool hands each out under its lock, so a warm block is never shared by two running requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from .states import KVStates

Kind = Literal["prefix", "modules"]


@dataclass(frozen=True)
class Reuse:
    """What a request may keep from a warm block.

    Attributes:
        kind: "prefix" or "modules" (see the module docstring).
        namespace: prefix kind: the tenant whose blocks it may continue.
        token_ids: prefix kind: the prompt tokens whose states may be kept (the prompt without its
            last token, which is always computed).
    """

    kind: Kind
    namespace: str = ""
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Contents:
    """What a block held when its request ended (slot by slot from slot 0).

    Attributes:
        kind: how its slots may be reused ("prefix" or "modules").
        namespace: prefix kind: the tenant.
        token_ids: prefix kind: the token in every filled slot (positions are 0..n-1).
        runs: modules kind: the stored states copied into the first slots, in slot order.
    """

    kind: Kind
    namespace: str = ""
    token_ids: tuple[int, ...] = ()
    runs: tuple[KVStates, ...] = ()


def reusable(contents: Contents | None, want: Reuse, parts: Sequence[KVStates]) -> int:
    """How many leading slots of a block holding `contents` a request (`want`, splicing `parts`) may keep."""
    if contents is None or contents.kind != want.kind:
        return 0
    if want.kind == "prefix":
        if contents.namespace != want.namespace:
            return 0
        return _common_length(contents.token_ids, want.token_ids)
    kept = 0
    for run, part in zip(contents.runs, parts):
        if not same_states(run, part):
            break
        kept += len(part)
    return kept


def same_states(a: KVStates, b: KVStates) -> bool:
    """True when `a` and `b` are views of the same stored tensors (same storage, offset, shape, stride)."""
    if a is b:
        return True
    if len(a) != len(b) or a.token_ids != b.token_ids or a.num_layers != b.num_layers:
        return False
    return (_same_tensor(a.positions, b.positions) or bool(torch.equal(a.positions, b.positions))) and \
        all(_same_tensor(x, y) for x, y in zip((*a.keys, *a.values), (*b.keys, *b.values)))


def contents_of(cache, token_ids: Sequence[int] | None) -> Contents | None:
    """The record of a request cache when its request ends (None: keep nothing).

    `cache` is a `kv.cache.RequestCache` made with `reuse`; `token_ids` the token in every filled
    slot (prefix kind; the prefill's prompt tokens and what the decoder fed).
    """
    want: Reuse | None = getattr(cache, "reuse", None)
    if want is None:
        return None
    filled = min(layer.get_seq_length() for layer in cache.layers)
    if want.kind == "prefix":
        if token_ids is None or len(token_ids) != filled:
            return None
        return Contents("prefix", want.namespace, tuple(token_ids))
    runs = tuple(cache.runs)
    if filled < sum(len(r) for r in runs):
        return None
    return Contents("modules", runs=runs)


def _same_tensor(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x is y or (x.device == y.device and x.dtype == y.dtype and x.shape == y.shape
                      and x.stride() == y.stride() and x.storage_offset() == y.storage_offset()
                      and x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr())


def _common_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if tuple(a[:n]) == tuple(b[:n]):
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]: bisect on slices (C-speed comparisons)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if a[:mid] == b[:mid] else (lo, mid)
    return lo
