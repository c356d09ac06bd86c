"""`BufferPool`: request-cache blocks kept for reuse between requests.

A request's cache is one block [2, layers, batch, kv_heads, capacity, head_dim] (keys, values). On
the CPU a fresh block of that size comes from the kernel as untouched pages: the splice copy then
page-faults on every 4 KiB (~33k faults for a 2k-token context on a 1024x8 model), which costs as
much as the copy itself, and more after a big request has handed its memory back to the kernel.
Reusing idle blocks keeps them resident. On CUDA torch's caching allocator already does this, so
the engine gives CUDA a pool of size 0.

A block handed out may hold another request's stale states past the caller's valid length; the
cache never exposes more than the tokens written into it (see `SpliceLayer`).
"""

from __future__ import annotations

import threading

import torch

from ..errors import StoreError

ROUND = 256  # capacities are rounded up to this many tokens so that similar requests share blocks


class BufferPool:
    """Idle blocks by geometry, at most `max_blocks` of them (least recently returned dropped first)."""

    def __init__(self, max_blocks: int = 4):
        if isinstance(max_blocks, bool) or not isinstance(max_blocks, int) or max_blocks < 0:
            raise StoreError(f"pool_blocks must be an int >= 0 or None, got {max_blocks!r}")
        self.max_blocks = max_blocks
        self._idle: list[torch.Tensor] = []  # oldest first
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def take(self, num_layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int,
             dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """A block with room for at least `capacity` tokens: the smallest idle one that fits, else new."""
        device = torch.device(device)
        head = (2, num_layers, batch, kv_heads)
        with self._lock:
            fits = [i for i, b in enumerate(self._idle)
                    if b.shape[:4] == head and b.shape[-1] == head_dim and b.shape[-2] >= capacity
                    and b.dtype == dtype and _same_device(b.device, device)]
            if fits:
                self.hits += 1
                return self._idle.pop(min(fits, key=lambda i: self._idle[i].shape[-2]))
            self.misses += 1
        rounded = -(-capacity // ROUND) * ROUND if self.max_blocks else capacity
        return torch.empty((*head, rounded, head_dim), dtype=dtype, device=device)

    def give(self, block: torch.Tensor) -> None:
        """Return a block taken from `take` once nothing reads or writes it any more."""
        if self.max_blocks == 0:
            return
        with self._lock:
            self._idle.append(block)
            del self._idle[: max(0, len(self._idle) - self.max_blocks)]

    @property
    def idle_bytes(self) -> int:
        with self._lock:
            return sum(b.numel() * b.element_size() for b in self._idle)

    def clear(self) -> None:
        with self._lock:
            self._idle.clear()


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)
