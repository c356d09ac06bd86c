"""`ModuleBudget`: how many bytes of module states the added schemas may need, all together.

Every added schema commits the engine to holding its cacheable modules' states: `add_schema` encodes
them, and a request re-encodes or reloads any that were dropped. Without a bound, any caller who may
add schemas (the server's `POST /v1/schemas`) grows that commitment without end. The budget is an
admission check at `add_schema`: a schema whose modules would take the added schemas past it is
refused, with a PromptError naming the budget, before anything is encoded; the schemas already added
keep serving. Replacing a schema counts its new version instead of the old; `remove_schema` frees
its share.

How it meets the memory tiers (`kv.store.ModuleStore`): the tier budgets (`device_budget_bytes`,
`host_budget_bytes`) decide where the added schemas' states live and drop the least recently used
(never pinned) ones when a tier is full; dropped states come back from the disk store or are
re-encoded. This budget bounds what there is to place: with no tier budgets, module memory stays
under it; with a disk store, it may exceed the tiers, which then hold the recently used part.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import PromptError

SERVER_MODULE_BUDGET_BYTES = 2 << 30
# The batching scheduler's defaults (`engine.scheduler`), here so that the CLI shows them without importing torch.
DEFAULT_MAX_BATCH = 16  # requests running at once
DEFAULT_KV_BUDGET_BYTES = 4 << 30  # request-cache memory running requests may reserve in all
DEFAULT_PREFILL_CHUNK = 256  # at most this many prompt tokens per step while other requests decode
"""`promptcache serve`'s default budget: a server takes schemas from any client that holds its key."""


class ModuleBudget:
    """The byte budget of the added schemas' module states.

    Args:
        budget_bytes: the most bytes the added schemas' token states (`need`) may take together, in the
            model's KV dtype (None: unbounded).
        adapter: the model adapter (layers, key/value heads, head size, dtype: the bytes of one token).
    """

    def __init__(self, budget_bytes: int | None, adapter):
        kv_heads, head_dim = adapter.kv_geometry
        self.budget_bytes = budget_bytes
        # keys and values of every layer: what `KVStates.nbytes` counts per token
        self.token_bytes = 2 * adapter.num_layers * kv_heads * head_dim * adapter.dtype.itemsize

    def need(self, version) -> int:
        """What `version` (a `modules.SchemaVersion`) counts against the budget: the states of every token it
        lays out (its passes: cached modules' and the rest's, which are encoded with them), at least one.

        NOTE: the floor and the uncached tokens make the number of schemas bounded too: a schema of
        cache="false" modules only, or of no text at all, still takes room (its layout, its name).
        """
        return self.token_bytes * max(1, sum(len(p.token_ids) for p in version.layout.passes))

    def check(self, version, added: Mapping[str, object]) -> None:
        """Refuse `version` if, with the `added` versions by name (its own name's replaced), it passes the budget.

        Raises:
            PromptError: naming the schema, its bytes, the budget and what the others use.
        """
        if self.budget_bytes is None:
            return
        others = [self.need(v) for name, v in added.items() if name != version.name]
        need = self.need(version)
        if sum(others) + need > self.budget_bytes:
            raise PromptError(
                f"schema '{version.name}' needs {need:,} bytes of module states; with the {len(others)} other "
                f"schemas added ({sum(others):,} bytes) that passes module_budget_bytes={self.budget_bytes:,}: "
                "remove a schema (remove_schema, DELETE /v1/schemas/NAME) or raise the budget "
                "(Engine(module_budget_bytes=...), promptcache serve --module-budget-bytes)")
