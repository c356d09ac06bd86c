"""Oracle recompute rules: what the best selection of stale tokens could buy back (benchmarks only).

An engine picks the stale tokens to recompute from what it has when the request comes: stored
states, the prompt, a cheap probe. These rules know the answer instead: which document holds it,
or the full prefill of the same prompt. They are rules of one's own (`Recompute(rule=...)`), used
by `quality.py --rules` to bound what any engine rule could reach at a given fraction; no engine
has them, and `quality.targets` never counts them.

- "document": the stale tokens of the document that holds the answer first, then the rest in
  order (docqa setups only: LongBench cases name no document).
- "oracle": the stale tokens whose stored keys and values (keys moved to the prompt's positions)
  are furthest from the full prefill's, summed over every layer, each layer's distance relative
  to its mean squared norm. What the engine's "deviation" rule estimates from its probe layer,
  known exactly, at no cost to the request (the full prefill runs beforehand, untimed).
- "marginal": the stale tokens whose recompute alone brings the answer's first-token distribution
  closest to the full prefill's (KL), each found by one cached prefill per candidate (docqa setups
  only: a prefill per stale token). The best ranking of single tokens by their effect on the answer.

Each oracle ranks the candidates once per case (`Ranked`); a fraction takes the first `budget`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from promptcache.engine.recompute import Candidate, Recompute
from promptcache.kv.states import KVStates
from promptcache.models.relocate import key_mover

ORACLES = ("document", "oracle", "marginal")
DOCUMENT_ONLY = ("document", "marginal")  # oracles that run on docqa setups only (see above)


def document_first(document: str):
    """The "document" oracle for one case: its document's stale tokens, then the rest, in order."""
    def rule(cands: Sequence[Candidate], budget: int) -> list[int]:
        order = [j for j, c in enumerate(cands) if c.module == document]
        order += [j for j, c in enumerate(cands) if c.module != document]
        return order[:budget]
    return rule


@dataclass
class Ranked:
    """A rule that ranks a case's candidates once (`rank`) and takes the first `budget` of that order.

    The candidates of one prompt are the same at every fraction, so the ranking is computed on the
    first call and reused; another candidate list (a bug in the caller) is an error.
    """

    rank: Callable[[Sequence[Candidate]], list[int]]
    order: list[int] | None = None
    seen: tuple[Candidate, ...] | None = field(default=None, repr=False)

    def __call__(self, cands: Sequence[Candidate], budget: int) -> list[int]:
        if self.order is None:
            self.seen, self.order = tuple(cands), self.rank(cands)
        assert tuple(cands) == self.seen, "one ranking serves one prompt's candidates"
        return self.order[:budget]


def full_states(engine, prompt: str) -> KVStates:
    """Keys and values of every prompt token in the full prefill (positions 0..n-1), copied."""
    plan = engine.plan(prompt, enable_cache=False)
    with engine.prefill(plan) as pre:
        n = pre.length
        return KVStates.concat([pre.cache.states(plan.tokens.token_ids[:n], torch.arange(n))])


def deviation_oracle(engine, schema: str, full: KVStates) -> Ranked:
    """The "oracle" rule for one prompt of `schema` whose full-prefill states are `full`."""
    mover = key_mover(engine.model)

    def rank(cands: Sequence[Candidate]) -> list[int]:
        scores = torch.zeros(len(cands), dtype=torch.float64)
        by_module: dict[str, list[int]] = {}
        for j, c in enumerate(cands):
            by_module.setdefault(c.module, []).append(j)
        for module, idx in by_module.items():
            stored = engine.module_states(schema, module)
            assert stored is not None, f"module {module!r} of {schema} is not in memory after its request"
            offsets = torch.tensor([cands[j].offset for j in idx], dtype=torch.long, device=stored.device)
            at = torch.tensor([cands[j].position for j in idx], dtype=torch.long, device=full.device)
            delta = at.cpu() - stored.positions[offsets].cpu()
            for layer in range(full.num_layers):
                keys = stored.keys[layer].index_select(2, offsets).to(full.device)
                if mover is not None and bool(delta.any()):
                    keys = mover.move(keys, delta)
                values = stored.values[layer].index_select(2, offsets).to(full.device)
                scores[idx] += _distance(full.keys[layer], keys, at) + _distance(full.values[layer], values, at)
        return torch.sort(scores, descending=True, stable=True).indices.tolist()

    return Ranked(rank)


def _distance(full: torch.Tensor, stored: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """Squared distance per token of `stored` [1, heads, n, d] to `full` at token indices `at`,
    relative to the mean squared norm of a token's states in `full` (this layer's scale)."""
    full = full.float()
    scale = full.pow(2).sum(dim=(0, 1, 3)).mean().clamp(min=1e-12)
    return ((full.index_select(2, at) - stored.float()).pow(2).sum(dim=(0, 1, 3)) / scale).double().cpu()


def marginal_oracle(engine, prompt: str, full_logprobs: torch.Tensor) -> Ranked:
    """The "marginal" rule for one prompt: candidates by how far recomputing each alone lowers
    KL(full || cached) of the first-token distribution (largest drop first)."""
    def kl_with(chosen: list[int]) -> float:
        plan = engine.plan(prompt)
        with engine.prefill(plan, recompute=Recompute(1.0, rule=lambda cands, budget: chosen)) as pre:
            cached = pre.logits.float().log_softmax(-1).cpu()
        return max(0.0, float((full_logprobs.exp() * (full_logprobs - cached)).sum()))

    def rank(cands: Sequence[Candidate]) -> list[int]:
        base = kl_with([])
        gains = torch.tensor([base - kl_with([j]) for j in range(len(cands))], dtype=torch.float64)
        return torch.sort(gains, descending=True, stable=True).indices.tolist()

    return Ranked(rank)
