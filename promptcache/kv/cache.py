"""The per-request cache: spliced module states in one preallocated buffer per layer.

transformers' `DynamicLayer` grows by `torch.cat`, copying the whole context at every decode step.
`SpliceLayer` allocates room for the prompt plus the tokens to generate once, copies the spliced
states in (the one O(context) copy of a request), and then writes each new token in place: the
keys/values the model sees are views of the buffer. Stored module states are only read, never
written, so concurrent requests can share them.

A request cache starts with room for its prompt and a few generated tokens, and grows as tokens
are generated (`RequestCache.reserve`): memory follows the tokens actually generated, not
`max_new_tokens`. Growing takes a bigger block from the pool, copies the filled slots once and gives
the old block back (amortised: each growth adds a quarter of the capacity, at least `GROW_SLOTS`).
Writing past the capacity without reserving is a bug in the caller and fails an assertion.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .pool import ROUND, BufferPool
from .states import KVStates
from .warm import Reuse


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
        end = self.length + key_states.shape[-2]
        assert end <= self.k_buf.shape[-2], f"request cache overflow: {end} tokens, capacity {self.k_buf.shape[-2]}"
        self.k_buf[:, :, self.length:end].copy_(key_states)
        self.v_buf[:, :, self.length:end].copy_(value_states)
        self.length = end
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def rebind(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Read and write another buffer from now on (it holds this layer's filled slots already)."""
        self.k_buf, self.v_buf = keys, values

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.length = 0

    def crop(self, max_length: int) -> None:
        self.length = min(self.length, max_length) if max_length >= 0 else max(0, self.length + max_length)


class RequestCache(Cache):
    """A `Cache` of `SpliceLayer`s viewing one block [2, layers, batch, kv_heads, capacity, head_dim].

    Attributes:
        block: the block; give it back to the pool it came from once the request is done.
        spliced_positions: [n] int64, the positions of the `n` tokens spliced in by `request_cache`
            (empty when none were).
        reuse / runs / kept: set by `request_cache`: what a later request may keep of this block
            (`kv.warm.Reuse`, None: nothing), the parts spliced into its first slots, and how many
            leading slots a warm block already held.
    """

    def __init__(self, block: torch.Tensor, length: int, spliced_positions: torch.Tensor | None = None):
        super().__init__(layers=[SpliceLayer(block[0, i], block[1, i], length) for i in range(block.shape[1])])
        self.block = block
        if spliced_positions is None:
            spliced_positions = torch.empty(0, dtype=torch.long, device=block.device)
        self.spliced_positions = spliced_positions
        self.reuse: Reuse | None = None
        self.runs: tuple[KVStates, ...] = ()
        self.kept = 0
        self.pool: BufferPool = _UNPOOLED  # where a bigger block comes from when the cache grows

    @property
    def capacity(self) -> int:
        return self.block.shape[-2]

    @property
    def length(self) -> int:
        """Filled slots (every layer holds as many)."""
        return self.layers[0].length

    @property
    def nbytes(self) -> int:
        return self.block.numel() * self.block.element_size()

    def write(self, layer: int, at: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Put states [batch, kv_heads, n, head_dim] into slots at..at+n-1 of `layer` (filled counts unchanged:
        `fill_to` sets them once every layer is written)."""
        la = self.layers[layer]
        assert at + keys.shape[-2] <= la.k_buf.shape[-2], "request cache overflow: reserve first"
        la.k_buf[:, :, at:at + keys.shape[-2]].copy_(keys)
        la.v_buf[:, :, at:at + values.shape[-2]].copy_(values)

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the keys and values in `slots` (filled or not) of `layer`: [batch, kv_heads, len(slots), d]."""
        la = self.layers[layer]
        return la.k_buf[:, :, slots], la.v_buf[:, :, slots]

    def fill_to(self, n: int) -> None:
        """Every layer holds its first `n` slots from now on (later ones are free to overwrite)."""
        assert n <= self.capacity, f"request cache overflow: {n} slots, capacity {self.capacity}"
        for layer in self.layers:
            layer.length = n

    def append(self, states: torch.Tensor) -> None:
        """Append states [2, layers, batch, kv_heads, n, head_dim] (keys, values) after the filled slots."""
        at, n = self.length, states.shape[-2]
        assert at + n <= self.capacity, f"request cache overflow: {at + n} slots, capacity {self.capacity}"
        self.block[..., at:at + n, :].copy_(states)
        self.fill_to(at + n)

    def reserve(self, slots: int) -> None:
        """Make room for `slots` slots in all: a bigger block (from the pool) when the block is full, with
        the filled slots copied over; the old block goes back to the pool."""
        if slots <= self.capacity:
            return
        old = self.block
        grown = max(slots, self.capacity + max(GROW_SLOTS, self.capacity // 4))
        two, layers, batch, kv_heads, _, head_dim = old.shape
        new = self.pool.take(layers, batch, kv_heads, -(-grown // ROUND) * ROUND, head_dim, old.dtype, old.device)
        n = self.length
        new[..., :n, :].copy_(old[..., :n, :])
        for i, layer in enumerate(self.layers):
            layer.rebind(new[0, i], new[1, i])
        self.block = new
        self.pool.give(old)

    def states(self, token_ids: Sequence[int], positions: torch.Tensor, row: int = 0) -> KVStates:
        """The first `len(token_ids)` tokens of batch row `row` as `KVStates`: views of the block.

        Copy them (`KVStates.concat`) before the block goes back to the pool.
        """
        n = len(token_ids)
        return KVStates(tuple(token_ids), positions,
                        tuple(la.keys[row:row + 1, :, :n] for la in self.layers),
                        tuple(la.values[row:row + 1, :, :n] for la in self.layers))


_UNPOOLED = BufferPool(0)  # allocates exactly what is asked, keeps nothing
GROW_SLOTS = 256  # the least a full request cache grows by (`RequestCache.reserve`)


def request_cache(parts: Sequence[KVStates], capacity: int, *, num_layers: int, kv_heads: int, head_dim: int,
                  device: torch.device | str, dtype: torch.dtype, batch: int = 1,
                  pool: BufferPool | None = None, reuse: Reuse | None = None) -> RequestCache:
    """A request's cache: `parts` spliced back to back (none: an empty cache), room for `capacity` tokens.

    Every batch row gets the same `parts`. The block comes from `pool` when given; give `cache.block`
    back to it once the request is done. `cache.spliced_positions` holds the parts' positions.

    With `reuse` (and a pool), a warm block that already holds the first parts (or, for a prefix,
    the first tokens of `reuse.token_ids`) is taken and only the rest is copied (see `kv.warm`). A
    prefix may then keep more tokens than `parts` cover: the cache holds them all.

    Args:
        parts: states to splice, in order; each [1, kv_heads, seq, head_dim] per layer. May be empty.
        capacity: tokens the cache must hold in all (spliced ones included); at least their count is kept.
        num_layers, kv_heads, head_dim: the model's KV geometry (the parts must match it).
    """
    n = sum(len(p) for p in parts)
    for p in parts:
        k = p.keys[0]
        assert (p.num_layers, k.shape[1], k.shape[-1]) == (num_layers, kv_heads, head_dim), \
            f"states of geometry {(p.num_layers, k.shape[1], k.shape[-1])}, cache {(num_layers, kv_heads, head_dim)}"
    geometry = (num_layers, batch, kv_heads, max(capacity, n), head_dim, dtype, device)
    if reuse is not None and pool is not None:
        block, kept = pool.take_warm(*geometry, reuse, parts)
    else:
        block, kept = (pool or _UNPOOLED).take(*geometry), 0
    at = 0
    for p in parts:  # copy what the block does not hold yet
        m, skip = len(p), min(len(p), max(0, kept - at))
        for i in range(num_layers) if skip < m else ():
            block[0, i, :, :, at + skip:at + m].copy_(p.keys[i][:, :, skip:], non_blocking=True)
            block[1, i, :, :, at + skip:at + m].copy_(p.values[i][:, :, skip:], non_blocking=True)
        at += m
    if kept > n:  # a warm prefix longer than the parts: positions 0..kept-1
        positions = torch.arange(kept, dtype=torch.long, device=block.device)
    else:
        positions = torch.cat([p.positions.to(block.device) for p in parts]) if parts else None
    cache = RequestCache(block, max(n, kept), positions)
    cache.reuse, cache.runs, cache.kept = reuse, tuple(parts), kept
    cache.pool = pool or _UNPOOLED
    return cache
