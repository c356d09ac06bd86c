"""Cache management, without HTTP: warm a prefix, list what is cached, pin, unpin, release, evict.

- Warm: a plain prompt or a chat is prefilled (the first token is picked and dropped: no decoding)
  and its states kept for a TTL ("5m", "1h") or pinned (ttl null), under the request's tenant.
- List: schemas and their modules (tokens, bytes, tier, pinned over HTTP), the kept prefixes
  (tenant, tokens, bytes, TTL and seconds left, pinned) and the prefix tree's totals. `cache_salt`
  narrows the prefixes to one tenant.
- Pin / unpin: a kept prefix (by key) or a module (schema + module); release: a kept prefix stops
  being held (it may then be evicted like any other); evict: free bytes of the prefix tree now,
  least recently used first (held prefixes never go).

Tenants compose as in requests: module states are shared, prefixes belong to their tenant, and a
tenant's request never reads another tenant's prefix (the tree keeps one root per tenant).
"""

from __future__ import annotations

import threading

from ..engine.keep import TTL_SECONDS, Breakpoint
from ..errors import PromptError
from .errors import ApiError


class CacheAdmin:
    """The cache endpoints' logic over one engine.

    Args:
        service: the server's `Service` (its engine, config and gate).
    """

    def __init__(self, service):
        self.service, self.engine = service, service.engine
        self._lock = threading.Lock()
        self._pinned_modules: set[tuple[str, str]] = set()

    def warm(self, prompt: str | list[dict], ttl: str | None, namespace: str) -> dict:
        """Prefill `prompt` (text or chat messages) and keep its states; what was read, written and kept."""
        keeper = self._keeper()
        ttl_s = None if ttl is None else TTL_SECONDS[ttl]
        with self.service.admit():
            done = self.engine.generate(prompt, max_new_tokens=1, enable_cache=True, namespace=namespace)
            if isinstance(prompt, str):
                ids = self.engine.plan(prompt, namespace=namespace).token_ids
                held = keeper.keep(ids, len(ids), ttl_s, namespace)
            else:
                end = Breakpoint(len(prompt) - 1, len(prompt[-1]["content"]), ttl_s)
                held = self.engine.keep_prefix(prompt, [end], namespace)[0].held
        usage = done.usage
        return {"object": "cache.warm", "prompt_tokens": usage.input_tokens, "cache_read_tokens": usage.cached_tokens,
                "cache_write_tokens": usage.cache_write_tokens, "kept_tokens": held,
                "prefix": self._entry(held, namespace)}

    def listing(self, namespace: str | None) -> dict:
        prefix = self.engine.prefix
        per_token = prefix.nbytes / prefix.num_tokens if prefix is not None and prefix.num_tokens else 0.0
        kept = [] if self.engine.keeper is None else self.engine.keeper.entries()
        return {
            "object": "cache",
            "schemas": [self._schema(name, layout) for name, layout in sorted(self.engine.schemas.items())],
            "prefixes": [{"key": e.key, "cache_salt": e.namespace, "tokens": e.tokens,
                          "bytes": round(e.tokens * per_token), "ttl_s": e.ttl_s,
                          "expires_in_s": None if e.expires_in_s is None else round(e.expires_in_s, 3),
                          "pinned": e.pinned} for e in kept if namespace is None or e.namespace == namespace],
            "prefix_tree": {"bytes": prefix.nbytes if prefix is not None else 0,
                            "tokens": prefix.num_tokens if prefix is not None else 0,
                            "budget_bytes": prefix.budget_bytes if prefix is not None else 0},
        }

    def pin_prefix(self, key: str, pinned: bool, ttl: str) -> dict:
        try:
            entry = self._keeper().pin(key, pinned, TTL_SECONDS[ttl])
        except PromptError as e:
            raise ApiError(404, str(e), code="prefix_not_found") from None
        return {"key": entry.key, "pinned": entry.pinned, "expires_in_s": entry.expires_in_s}

    def release_prefix(self, key: str) -> dict:
        try:
            self._keeper().release(key)
        except PromptError as e:
            raise ApiError(404, str(e), code="prefix_not_found") from None
        return {"key": key, "released": True}

    def pin_module(self, schema: str, module: str, pinned: bool) -> dict:
        with self.service.admit():  # pinning may encode the module first
            if pinned:
                self.engine.pin(schema, module)
                self._pinned_modules.add((schema, module))
            else:
                self.engine.unpin(schema, module)
                self._pinned_modules.discard((schema, module))
        return {"schema": schema, "module": module, "pinned": pinned, "tier": self.engine.module_tier(schema, module)}

    def evict(self, nbytes: int) -> dict:
        prefix = self.engine.prefix
        freed = prefix.evict(nbytes) if prefix is not None else 0
        return {"object": "cache.evict", "freed_bytes": freed, "prefix_tree_bytes": prefix.nbytes if prefix else 0}

    def _schema(self, name: str, layout) -> dict:
        modules = []
        for path, module in sorted(layout.modules.items(), key=lambda kv: kv[1].start):
            states = self.engine.module_states(name, path)
            modules.append({"name": path, "tokens": len(module.token_ids),
                            "bytes": states.nbytes if states is not None else 0,
                            "tier": self.engine.module_tier(name, path),
                            "pinned": (name, path) in self._pinned_modules})
        return {"id": name, "modules": modules}

    def _entry(self, held: int, namespace: str) -> dict | None:
        for entry in self._keeper().entries():
            if entry.namespace == namespace and entry.tokens == held:
                return {"key": entry.key, "tokens": entry.tokens, "ttl_s": entry.ttl_s, "pinned": entry.pinned}
        return None

    def _keeper(self):
        if self.engine.keeper is None:
            raise ApiError(400, "the prefix cache is off (--no-prefix-cache): nothing can be kept")
        return self.engine.keeper
