"""The per-request cache: spliced module states in one preallocated buffer per layer.

transformers' `DynamicLayer` grows by `torch.cat`, copying the whole context at every decode step.
`SpliceLayer` allocates room for the prompt plus the tokens to generate once, copies the spliced
states in (the one O(context) copy of a request), and then writes each new token in place: the
keys/values the model sees are views of the buffer. Stored module states are only read, never
written, so concurrent requests can share them.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .pool import BufferPool
from .states import KVStates


class SpliceLayer(CacheLayerMixin):
    """One layer's keys/values: buffer [batch, kv_heads, capacity, head_dim], first `length` valid."""

    is_sliding = False
    is_compileable = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        super().__init__()
        self.k_buf, self.v_buf, self.length = keys, values, length
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    @property
    def keys(self) -> torch.Tensor:
        return self.k_buf[:, :, : self.length]

    @keys.setter
    def keys(self, value):  # CacheLayerMixin.__init__ assigns None; the buffer is the truth.
        pass

    @property
    def values(self) -> torch.Tensor:
        return self.v_buf[:, :, : self.length]

    @values.setter
    def values(self, value):
        pass

    def lazy_initialization(self, key_states, value_states) -> None:  # pragma: no cover - never lazy
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n = key_states.shape[-2]
        end = self.length + n
        if end > self.k_buf.shape[-2]:
            self._grow(end)
        self.k_buf[:, :, self.length:end].copy_(key_states)
        self.v_buf[:, :, self.length:end].copy_(value_states)
        self.length = end
        return self.keys, self.values

    def _grow(self, needed: int) -> None:
        # Amortised doubling: only when the caller under-estimated the room needed.
        cap = max(needed, 2 * self.k_buf.shape[-2])
        for name in ("k_buf", "v_buf"):
            old = getattr(self, name)
            new = old.new_empty((*old.shape[:2], cap, old.shape[-1]))
            new[:, :, : self.length].copy_(old[:, :, : self.length])
            setattr(self, name, new)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.length = 0

    def crop(self, max_length: int) -> None:
        self.length = min(self.length, max_length) if max_length >= 0 else max(0, self.length + max_length)


class RequestCache(Cache):
    """A `Cache` of `SpliceLayer`s viewing one block [2, layers, batch, kv_heads, capacity, head_dim]."""

    def __init__(self, block: torch.Tensor, length: int):
        super().__init__(layers=[SpliceLayer(block[0, i], block[1, i], length) for i in range(block.shape[1])])
        self.block = block


_UNPOOLED = BufferPool(0)  # allocates exactly what is asked, keeps nothing


def splice(parts: list[KVStates], capacity: int, device: torch.device, dtype: torch.dtype,
           batch: int = 1, pool: BufferPool | None = None) -> tuple[RequestCache, torch.Tensor]:
    """A cache holding `parts` back to back (room for `capacity` tokens) and their positions.

    With `pool`, the block comes from it; give `cache.block` back when the request is done.
    """
    assert parts
    n = sum(len(p) for p in parts)
    k0 = parts[0].keys[0]
    block = (pool or _UNPOOLED).take(parts[0].num_layers, batch, k0.shape[1], max(capacity, n), k0.shape[-1],
                                     dtype, device)
    for i in range(parts[0].num_layers):
        at = 0
        for p in parts:
            m = len(p)
            block[0, i, :, :, at:at + m].copy_(p.keys[i], non_blocking=True)
            block[1, i, :, :, at:at + m].copy_(p.values[i], non_blocking=True)
            at += m
    positions = torch.cat([p.positions.to(device) for p in parts])
    return RequestCache(block, n), positions


def empty_cache(num_layers: int, kv_heads: int, head_dim: int, capacity: int, device, dtype,
                batch: int = 1, pool: BufferPool | None = None) -> RequestCache:
    return RequestCache((pool or _UNPOOLED).take(num_layers, batch, kv_heads, capacity, head_dim, dtype, device), 0)
