"""Batched decoding: one forward feeds the pending token of many requests, each over its own cache.

A decode step of a small model on a CPU is bound by per-layer dispatch and by reading the weights,
not by arithmetic: eight rows through the projections and the MLP cost little more than one. So the
scheduler (`engine.scheduler`) feeds the pending token of every running request in one forward of
`[rows, 1]` tokens. Everything but attention is an ordinary batch. Attention is ragged: each row has
its own request cache (`kv.cache.RequestCache`), of its own length and capacity, and must attend to
its own keys only. The caches are read in place, never gathered into a padded batch (that would copy
every row's context at every step):

    forward of rows r0..r2, one token each, at each row's own position
    layer i   RowsCache.update:  row b's new key/value -> slot `length` of row b's block (in place)
              attention:         row b's query over row b's keys [0, length] (views of its block)
                                 rows [  r0: 812 keys  ][ r1: 95 keys ][ r2: 3,010 keys  ]

The attention function the engine registers (`adapter.grouped_attention`) knows it is in a batch
from a thread-local set around the forward (`rows_attention`); the model's attention calls it
through transformers' AttentionInterface (llama, mistral, qwen2, falcon, ...). Models whose attention
does not (MPT) decode their rows one by one (`Adapter.decode_rows`). In a sliding-window layer
(Gemma 3's local layers) a row sees only its keys less than the window back, counted in positions
(`RowsCache.window_mask`, as `adapter.window_masks` does for one request).

Decoding is in order: every key of a row is at a position before the row's new token, so a lone
query sees all of its row's keys and no mask is needed.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

_LOCAL = threading.local()


@dataclass(frozen=True)
class DecodeRow:
    """One request's pending token in a batched decode step.

    Attributes:
        token: the token to feed.
        position: its position (after every key of `cache`).
        cache: the request's cache (`kv.cache.RequestCache`); its next slot gets the token's state.
        key_positions: [capacity] the position of every key slot; slot `fed` is set to `position`.
        fed: keys in the cache before this token.
    """

    token: int
    position: int
    cache: object
    key_positions: torch.Tensor
    fed: int


class RowsLayer(CacheLayerMixin):
    """One layer of a batch of request caches: row b's keys and values live in row b's own block."""

    is_sliding = False
    is_compileable = False

    def __init__(self, rows: Sequence[CacheLayerMixin]):
        super().__init__()
        self.rows = list(rows)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # key_states: [rows, kv_heads, 1, head_dim]; each row appends to its own cache
        for b, layer in enumerate(self.rows):
            layer.update(key_states[b:b + 1], value_states[b:b + 1])
        return key_states, value_states  # NOTE: attention reads the rows' own caches (`rows_attention`)

    def lazy_initialization(self, key_states, value_states) -> None:  # pragma: no cover - never lazy
        pass

    def get_seq_length(self) -> int:
        return max(layer.get_seq_length() for layer in self.rows)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1


class RowsCache(Cache):
    """A transformers `Cache` over the request caches of a batch's rows (one row per cache).

    Args:
        rows: the batch's rows (their caches, positions and key positions).
        windows: per layer, the sliding window of a local layer (in positions), None for a global one.
    """

    def __init__(self, rows: Sequence[DecodeRow], windows: Sequence[int | None]):
        layers = range(len(rows[0].cache.layers))
        super().__init__(layers=[RowsLayer([r.cache.layers[i] for r in rows]) for i in layers])
        self.rows, self.windows = list(rows), list(windows)

    def window_mask(self, layer: int, b: int) -> torch.Tensor | None:
        """For a local layer, which of row b's keys [1, 1, 1, keys] (bool) its token sees: those less than
        the window back in positions (a gap counts as the positions it stands for); None: all of them."""
        window, row = self.windows[layer], self.rows[b]
        if window is None:
            return None
        k_pos = row.key_positions[: row.fed + 1]
        if row.position - int(k_pos.min()) < window:
            return None
        return (k_pos > row.position - window).view(1, 1, 1, -1)


@contextmanager
def batch_of(cache: RowsCache):
    """Within: the registered attention reads each row's own cache (this thread only)."""
    _LOCAL.cache = cache
    try:
        yield
    finally:
        _LOCAL.cache = None


def current_rows() -> RowsCache | None:
    return getattr(_LOCAL, "cache", None)


def rows_attention(module, query: torch.Tensor, scaling: float | None, rows: RowsCache, attend) -> torch.Tensor:
    """query [rows, heads, 1, d]: row b attends to row b's keys and values (its new token's included; in a
    local layer only those within the window); `attend(query, key, value, mask)` is the one-row attention.
    Returns [rows, 1, heads, d]."""
    i = module.layer_idx
    return torch.cat([attend(query[b:b + 1], row.keys, row.values, rows.window_mask(i, b))
                      for b, row in enumerate(rows.layers[i].rows)])
