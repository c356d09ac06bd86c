"""The module store: encoded module states in two memory tiers.

Tiers: "device" (the model's device) while `device_budget` bytes allow, else "host" (CPU memory,
pinned when CUDA is present so uploads are asynchronous). A request copies states out of
whichever tier holds them into its own cache, so moving between tiers never changes results.

Eviction (the order is asserted in tests/engine/test_tiers.py and tests/kv/test_store.py):
1. Adding to a full device tier demotes device entries to the host tier, least recently used
   first, when that makes room (else nothing is demoted and the new entry goes to the host);
   pinned entries are never demoted or dropped.
2. Adding to a full host tier drops host entries, least recently used first (a later request
   re-encodes them, or reloads them from the disk store).
3. Entries idle longer than `ttl_s` are dropped at the next store operation.
An entry that fits in no tier is still kept on the host: a request never fails for a budget.
Requests hold references to the states they spliced, so eviction never breaks one in flight.
"""

from __future__ import annotations

import logging
import threading

import torch

from ..errors import StoreError
from .policy import LRUPolicy
from .states import KVStates

logger = logging.getLogger(__name__)


class ModuleStore:
    def __init__(self, device: torch.device | str, device_budget: int | None = None,
                 host_budget: int | None = None, ttl_s: float | None = None, clock=None):
        for name, value in (("device_budget", device_budget), ("host_budget", host_budget)):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise StoreError(f"{name} must be a byte count >= 0 or None, got {value!r}")
        self.device = torch.device(device)
        kw = {"clock": clock} if clock else {}
        self.tiers = {"device": LRUPolicy(device_budget, ttl_s=ttl_s, **kw),
                      "host": LRUPolicy(host_budget, ttl_s=ttl_s, **kw)}
        self.entries: dict[str, KVStates] = {}
        self.lock = threading.RLock()
        self.pin_host = self.device.type == "cuda"

    def tier_of(self, key: str) -> str | None:
        with self.lock:
            return next((t for t, pol in self.tiers.items() if key in pol), None)

    def __contains__(self, key: str) -> bool:
        return self.tier_of(key) is not None

    def put(self, key: str, states: KVStates) -> str:
        """Store `states` under `key` (replacing any old entry); returns the tier it landed in."""
        with self.lock:
            self._expire()
            self.remove(key)
            size = states.nbytes
            dev = self.tiers["device"]
            if dev.could_fit(size):  # else demoting would not make room: demote nothing
                for victim in dev.victims(size):
                    self._demote(victim)
            if dev.fits(size):
                self.entries[key] = states if states.device == self.device else states.to(self.device)
                dev.add(key, size)
                return "device"
            self._to_host(key, states)
            return "host"

    def get(self, key: str) -> KVStates | None:
        """The states under `key` (marking them recently used), or None."""
        with self.lock:
            self._expire()
            tier = self.tier_of(key)
            if tier is None:
                return None
            self.tiers[tier].touch(key)
            return self.entries[key]

    def remove(self, key: str) -> None:
        with self.lock:
            for pol in self.tiers.values():
                if key in pol:
                    pol.remove(key)
            self.entries.pop(key, None)

    def pin(self, key: str) -> None:
        with self.lock:
            tier = self.tier_of(key)
            if tier is None:
                raise StoreError(f"cannot pin '{key}': not in the store")
            self.tiers[tier].pin(key)

    def unpin(self, key: str) -> None:
        with self.lock:
            tier = self.tier_of(key)
            if tier is not None:
                self.tiers[tier].unpin(key)

    def keys(self, tier: str | None = None) -> list[str]:
        with self.lock:
            pols = [self.tiers[tier]] if tier else self.tiers.values()
            return [k for pol in pols for k in pol.order()]

    def stats(self) -> dict[str, int]:
        with self.lock:
            return {"device_modules": len(self.tiers["device"]), "host_modules": len(self.tiers["host"]),
                    "device_bytes": self.tiers["device"].used_bytes, "host_bytes": self.tiers["host"].used_bytes}

    def _demote(self, key: str) -> None:
        states = self.entries.pop(key)
        self.tiers["device"].remove(key)
        logger.debug("demoting %s to host memory", key)
        self._to_host(key, states)

    def _to_host(self, key: str, states: KVStates) -> None:
        host = self.tiers["host"]
        for victim in host.victims(states.nbytes):
            logger.debug("dropping %s from host memory", victim)
            host.remove(victim)
            self.entries.pop(victim, None)
        on_host = states.device.type == "cpu" and not self.pin_host
        self.entries[key] = states if on_host else states.to("cpu", pin=self.pin_host)
        host.add(key, states.nbytes)

    def _expire(self) -> None:
        for pol in self.tiers.values():
            for key in pol.expired():
                pol.remove(key)
                self.entries.pop(key, None)
