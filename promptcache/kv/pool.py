"""`BufferPool`: request-cache blocks kept for reuse between requests.

A request's cache is one block [2, layers, batch, kv_heads, capacity, head_dim] (keys, values). On
the CPU a fresh block of that size comes from the kernel as untouched pages: the splice copy then
page-faults on every 4 KiB (~33k faults for a 2k-token context on a 1024x8 model), which costs as
much as the copy itself, and more after a big request has handed its memory back to the kernel.
Reusing idle blocks keeps them resident. On CUDA torch's caching allocator already does this, so
the engine gives CUDA a pool of size 0.

A block handed out may hold another request's stale states past the caller's valid length; the
cache never exposes more than the tokens written into it (see `SpliceLayer`).

A block may come back with a record of what it holds (`kv.warm.Contents`); `take_warm` then hands
it to the request that can keep the most of it (`kv.warm.reusable`), which copies only the rest.
Plain `take` prefers blocks without a record, so that warm contents outlive requests that cannot
use them.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from ..errors import StoreError
from .states import KVStates
from .warm import Contents, Reuse, reusable

ROUND = 256  # capacities are rounded up to this many tokens so that similar requests share blocks


DEFAULT_POOL_BYTES = 256 << 20  # idle blocks kept, in bytes (`BufferPool.max_bytes`)


class BufferPool:
    """Idle blocks by geometry, at most `max_blocks` of them and `max_bytes` in all (least recently
    returned dropped first; a block bigger than `max_bytes` is never kept).

    Counters: `hits` / `misses` (takes served by an idle block / by a new one), `warm_hits` (takes
    that kept a warm block's contents) and `kept_tokens` (slots those kept, in all).
    """

    def __init__(self, max_blocks: int = 4, max_bytes: int | None = DEFAULT_POOL_BYTES):
        if isinstance(max_blocks, bool) or not isinstance(max_blocks, int) or max_blocks < 0:
            raise StoreError(f"pool_blocks must be an int >= 0 or None, got {max_blocks!r}")
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0):
            raise StoreError(f"pool_bytes must be an int >= 0 or None, got {max_bytes!r}")
        self.max_blocks, self.max_bytes = max_blocks, max_bytes
        self._idle: list[torch.Tensor] = []  # oldest first
        self._contents: dict[int, Contents] = {}  # id(block) -> what it holds, for idle blocks with a record
        self._lock = threading.Lock()
        self.hits = self.misses = self.warm_hits = self.kept_tokens = 0

    def take(self, num_layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int,
             dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """A block with room for at least `capacity` tokens: the smallest idle one that fits (one without
        warm contents first), else new."""
        return self.take_warm(num_layers, batch, kv_heads, capacity, head_dim, dtype, device, None, ())[0]

    def take_warm(self, num_layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int,
                  dtype: torch.dtype, device: torch.device | str, want: Reuse | None,
                  parts: Sequence[KVStates]) -> tuple[torch.Tensor, int]:
        """(block, kept): the idle block whose contents `want` (splicing `parts`) may keep the most of,
        and how many leading slots it keeps (0: a block as `take` picks it, or a new one)."""
        device = torch.device(device)
        head = (2, num_layers, batch, kv_heads)
        with self._lock:
            fits = [i for i, b in enumerate(self._idle)
                    if b.shape[:4] == head and b.shape[-1] == head_dim and b.shape[-2] >= capacity
                    and b.dtype == dtype and _same_device(b.device, device)]
            if fits:
                kept = {i: reusable(self._contents.get(id(self._idle[i])), want, parts) if want else 0 for i in fits}
                best = min(fits, key=lambda i: (-kept[i], id(self._idle[i]) in self._contents,
                                                self._idle[i].shape[-2]))
                self.hits += 1
                if kept[best]:
                    self.warm_hits += 1
                    self.kept_tokens += kept[best]
                block = self._idle.pop(best)
                self._contents.pop(id(block), None)
                return block, kept[best]
            self.misses += 1
        rounded = -(-capacity // ROUND) * ROUND if self.max_blocks else capacity
        # NOTE: zeros, not empty: the compiled decode step (`models.compiled`) reads every slot and gives
        # the unfilled ones probability 0, and 0 * NaN from uninitialised memory would still be NaN.
        return torch.zeros((*head, rounded, head_dim), dtype=dtype, device=device), 0

    def give(self, block: torch.Tensor, contents: Contents | None = None) -> None:
        """Return a block taken from `take` once nothing reads or writes it any more, with a record of
        what it holds (`kv.warm.contents_of`) when a later request may continue from it."""
        if self.max_blocks == 0:
            return
        with self._lock:
            self._idle.append(block)
            if contents is not None:
                self._contents[id(block)] = contents
            drop = max(0, len(self._idle) - self.max_blocks)
            if self.max_bytes is not None:
                sizes = [_nbytes(b) for b in self._idle]
                total = sum(sizes)
                while drop < len(sizes) and total - sum(sizes[:drop]) > self.max_bytes:
                    drop += 1
            for old in self._idle[:drop]:
                self._contents.pop(id(old), None)
            del self._idle[:drop]

    @property
    def idle_bytes(self) -> int:
        with self._lock:
            return sum(_nbytes(b) for b in self._idle)

    def clear(self) -> None:
        with self._lock:
            self._idle.clear()
            self._contents.clear()


def _nbytes(block: torch.Tensor) -> int:
    return block.numel() * block.element_size()


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)
