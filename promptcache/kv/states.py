"""`KVStates`: the attention keys/values of a run of tokens, one (k, v) pair per layer.

This is the unit the module store, the disk store and the prefix tree hold. It never changes after
it is built: requests copy out of it into their own cache (see `kv.cache`), so stored states can be
shared by concurrent requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVStates:
    """Keys and values of `len(token_ids)` tokens at `positions`, for every layer.

    keys[i], values[i]: [1, kv_heads, seq, head_dim] for layer i.
    positions: [seq] int64, the absolute position id each token was computed at.
    """

    token_ids: tuple[int, ...]
    positions: torch.Tensor
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]

    def __post_init__(self):
        n = len(self.token_ids)
        assert self.positions.shape == (n,), (self.positions.shape, n)
        assert len(self.keys) == len(self.values) and all(k.shape[-2] == n for k in self.keys)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def device(self) -> torch.device:
        return self.keys[0].device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def to(self, device: torch.device | str, *, pin: bool = False, non_blocking: bool = False) -> KVStates:
        """A copy on `device` (pinned host memory when `pin` and the target is the CPU)."""

        def move(t: torch.Tensor) -> torch.Tensor:
            if pin and torch.device(device).type == "cpu" and torch.cuda.is_available():
                out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                return out.copy_(t, non_blocking=non_blocking)
            return t.to(device, non_blocking=non_blocking, copy=True)

        return KVStates(self.token_ids, self.positions.clone(), tuple(map(move, self.keys)),
                        tuple(map(move, self.values)))

    def slice(self, start: int, stop: int) -> KVStates:
        """Tokens [start, stop) as views (no copy)."""
        return KVStates(self.token_ids[start:stop], self.positions[start:stop],
                        tuple(k[:, :, start:stop] for k in self.keys),
                        tuple(v[:, :, start:stop] for v in self.values))

    @staticmethod
    def concat(parts: list[KVStates]) -> KVStates:
        """One contiguous copy of one or more runs, in the given order (owns its storage: a copy of a
        slice does not keep the sliced tensors alive)."""
        assert parts
        return KVStates(
            tuple(t for p in parts for t in p.token_ids),
            torch.cat([p.positions for p in parts]),
            tuple(torch.cat([p.keys[i] for p in parts], dim=-2) for i in range(parts[0].num_layers)),
            tuple(torch.cat([p.values[i] for p in parts], dim=-2) for i in range(parts[0].num_layers)),
        )
