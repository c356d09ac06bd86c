"""Encode a compiled schema: run its passes and cut the states into per-module `KVStates`.

Pass 0 runs the whole schema with every union at its scaffold member; each other union member
runs after the states of everything before its union (a prefix of its parent pass). Members of
one union share that prefix, so they run in batches (right-padded: padding sits after every real
token, so causal attention keeps it out of the real tokens' states), each at most `BATCH_TOKENS`
cache slots, so memory stays linear in the schema however many members a union has.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
from tqdm.auto import tqdm

from ..kv.cache import request_cache
from ..kv.states import KVStates
from ..markup.layout import EncodePass, SchemaLayout
from .prefill import run_chunks

logger = logging.getLogger(__name__)

BATCH_TOKENS = 8192  # cache slots one batch of union members may take (bounds encoding memory)

def _needed_passes(layout: SchemaLayout, want: set[str] | None) -> list[int]:
    if want is None:
        return list(range(len(layout.passes)))
    need = set()
    for i, p in enumerate(layout.passes):
        if want.intersection(p.owners):
            while i is not None and i not in need:
                need.add(i)
                i = layout.passes[i].parent
    return sorted(need)


def encode_schema(adapter, layout: SchemaLayout, want: set[str] | None = None,
                  progress: bool = True) -> dict[str, KVStates]:
    """States of every cacheable module (or only those in `want`), in the model's KV dtype."""
    todo = _needed_passes(layout, want)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i in todo:
        p = layout.passes[i]
        if not p.token_ids:  # an empty union member (e.g. <module name="none"/>): nothing to run
            groups[(p.parent, p.prefix_len, ("empty", i))].append(i)
            continue
        # Batch members of one union only when their positions are consecutive (no nested gaps).
        # NOTE: the start is part of the key: two unions after empty scaffolds share a prefix, but
        # a batch runs at one set of positions.
        batchable = p.positions == tuple(range(p.positions[0], p.positions[0] + len(p.positions)))
        groups[(p.parent, p.prefix_len, p.positions[0] if batchable else ("alone", i))].append(i)
    full: dict[int, KVStates | None] = {}   # states of passes others run after, prefix included (views)
    parents = {layout.passes[i].parent for i in todo}
    pieces: dict[str, list[KVStates]] = defaultdict(list)
    total = sum(len(layout.passes[i].token_ids) for i in todo)
    with tqdm(total=total, desc=f"encoding {layout.name}", unit="tok", disable=not progress,
              leave=False) as bar:
        for (parent, prefix_len, _), members in groups.items():
            context = full[parent] if parent is not None else None
            prefix = context.slice(0, prefix_len) if context is not None else None
            if not layout.passes[members[0]].token_ids:
                full[members[0]] = prefix  # nested unions inside an empty member see just its prefix
                continue
            for batch in _batches(layout, members, prefix_len):
                for i, states in zip(batch, _run_group(adapter, layout, batch, prefix)):
                    if i in parents:  # a nested union runs after this pass: keep its states (views)
                        full[i] = states
                    _collect(layout.passes[i], states.slice(prefix_len, len(states)), pieces)
                    bar.update(len(layout.passes[i].token_ids))
    out = {}
    for path, parts in pieces.items():
        if layout.modules[path].cache and (want is None or path in want):
            out[path] = parts[0] if len(parts) == 1 else KVStates.concat(parts)
    logger.info("encoded schema %s: %d passes, %d tokens, %d modules", layout.name, len(todo), total, len(out))
    return out


def _batches(layout: SchemaLayout, members: list[int], prefix_len: int) -> list[list[int]]:
    """Members in batches of at most BATCH_TOKENS cache slots (rows x (prefix + widest)), at least one each.

    Every row holds a copy of the shared prefix: one batch of all members would take memory
    proportional to members x prefix (400 one-token members after 1,000 tokens: 400k slots).
    """
    width = max(len(layout.passes[i].token_ids) for i in members)
    rows = max(1, BATCH_TOKENS // (prefix_len + width))
    return [members[a:a + rows] for a in range(0, len(members), rows)]


def _collect(p: EncodePass, own: KVStates, pieces: dict[str, list[KVStates]]) -> None:
    """Split a pass's own states by owner into runs of consecutive tokens."""
    start = 0
    for j in range(1, len(p.owners) + 1):
        if j == len(p.owners) or p.owners[j] != p.owners[start]:
            if p.owners[start] is not None:
                # a compact copy at once: never keeps a batch's cache (prefix copies) alive
                pieces[p.owners[start]].append(KVStates.concat([own.slice(start, j)]))
            start = j


def _run_group(adapter, layout: SchemaLayout, members: list[int], prefix: KVStates | None) -> list[KVStates]:
    """Run passes sharing one prefix as a right-padded batch; each pass's states (prefix + own)."""
    passes = [layout.passes[i] for i in members]
    width = max(len(p.token_ids) for p in passes)
    dev = adapter.device
    ids = torch.zeros((len(passes), width), dtype=torch.long, device=dev)
    for r, p in enumerate(passes):
        ids[r, : len(p.token_ids)] = torch.tensor(p.token_ids, dtype=torch.long)
    # One batch shares positions: the longest pass's; padding continues past shorter ones.
    q_pos = torch.tensor(max(passes, key=lambda p: len(p.token_ids)).positions, dtype=torch.long, device=dev)
    parts = [prefix] if prefix is not None and len(prefix) else []
    kv_heads, head_dim = adapter.kv_geometry
    cache = request_cache(parts, sum(len(p) for p in parts) + width, num_layers=adapter.num_layers,
                          kv_heads=kv_heads, head_dim=head_dim, device=dev, dtype=adapter.dtype, batch=len(passes))
    n_prefix = len(cache.spliced_positions)
    all_pos = torch.cat([cache.spliced_positions, q_pos])
    run_chunks(adapter, ids, all_pos, n_prefix, cache)
    out = []
    for r, p in enumerate(passes):
        toks = (prefix.token_ids if prefix is not None else ()) + p.token_ids
        pos = torch.cat([all_pos[:n_prefix], torch.tensor(p.positions, dtype=torch.long, device=dev)])
        out.append(cache.states(toks, pos, row=r))
    return out
