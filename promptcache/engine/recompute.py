"""Selective recompute: repair spliced states whose context changed, for a fraction of the cost.

A module's states are exact only in the context they were encoded in: the schema's tokens before
it, at the schema's positions. A prompt that skips a module, picks a non-scaffold union member or
passes an argument other than the filler changes that context for everything after the change:

    schema (encoded)   [root][a][b][union: detailed][trip(filler)][c]
    prompt             [root][a]   [union: brief]   [trip(arg)]   [c][question]
    full prefill       0 ........ contiguous positions ........................
                       |-- kept --|------------- stale: context changed -------|

Given `Recompute(fraction)`, a prompt's request runs in three steps (`Blend.prefill`):

1. Classify every spliced token: *kept* when its encoding context is exactly the prompt's tokens
   before it at the same positions, and those positions are contiguous from 0 (its stored state
   is the full prefill's); else *stale*. A prompt whose spliced tokens all match their encoding
   context is never touched (`plan_blend` returns None), except that new tokens after a trailing
   gap are moved down to close it.
2. Close the gaps: every token goes to its rank in the prompt (the full prefill's positions). A
   stale token reused as stored has its keys rotated there (`models.relocate.KeyMover`).
3. Recompute `round(fraction * spliced tokens)` stale tokens (the prompt's new tokens are always
   computed), chosen by `rule`, attending to everything before them in the prompt; the rest are
   reused. The rules:
   - "first" (the default): the stale tokens right after the first change, a partial prefix
     recompute. Their recomputed states are exactly the full prefill's (everything they attend to
     is kept or recomputed), and the cheapest: no probe, and its tokens run in order without a
     mask. On SmolLM2-135M (benchmarks/README.md, "On the real model") its agreement with the full
     prefill is within 0.04 of "deviation" at 10-20% on every setup, its accuracy 4.6-6.2 points
     lower on skipped modules, and it is 2.4-2.9x faster at 4k tokens.
   - "deviation" (CacheBlend's idea): run every stale and new token through the first
     `probe_layer + 1` decoder layers in the prompt's real context (a few of the model's layers)
     and recompute the tokens whose keys and values at that layer moved furthest from the stored
     ones. The probe's exact states of the early layers replace the stored ones of every stale
     token that is reused.
   - "leading" (EPIC's LegoLink): the first tokens of each run of stale tokens, round-robin.
   - "uniform": evenly spaced stale tokens (a control).
   - a callable (a rule of your own, e.g. to study selection): given every candidate as a
     `Candidate` (its module, offset in the module, position, token) and the budget, it returns
     the indices of the candidates to recompute, at most the budget. It runs before the request
     takes a cache; an invalid answer is a PromptError naming the rule. Such requests skip the
     response cache (a function has no stable identity across runs).

`fraction=1.0` recomputes every stale token: the prefill is then the full prefill of the same text
(kept tokens are its states already). Such a prefill is marked `Prefill.exact`, and the engine keeps
its states in the prefix tree: a later full recompute of the same text up to its last module reads
them there instead (`recomputes_all`), so exactness is paid once per text. Stored states are only
read; the request's own cache block is where keys are rotated and states written.

Two groups of models (`models.relocate.key_mover`):
- keys move, gaps close: llama, mistral, mixtral, qwen2, qwen3, falcon (rotary), gemma, gemma2, olmo,
  olmo2, starcoder2 (rotated), mpt (ALiBi). `fraction=1.0` is the full prefill of the prompt's text.
- keys cannot move, gaps stay (every other RoPE family, e.g. phi3, granite, smollm3, gpt_neox, olmo3,
  glm): `fraction=1.0` recomputes every stale token at the planned positions, gaps and all. That is the
  full prefill of the text only when the prompt has no gap, and only then may a kept prefix stand in
  for it: the answer never depends on what earlier requests left in the prefix tree.
"""

from __future__ import annotations

import itertools
import math
import numbers
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from ..errors import PromptCacheError, PromptError
from ..kv.states import KVStates
from ..markup.layout import PromptPlan, SchemaLayout
from ..models.relocate import KeyMover, key_mover, probe_forward
from . import prefill as _prefill
from .prefill import CacheSpec, Prefill, prefill_modules, run_chunks

MAX_QUERY_RUNS = 8  # more runs of recomputed tokens than this: one masked forward, not a forward per run
# NOTE: measured choice (benchmarks/README.md, "On the real model"): up to 20% recomputed, no rule brings
# skipped modules or union members to 90% agreement on SmolLM2-135M, while TTFT at 4k falls from 85x to 7-13x.
DEFAULT_RECOMPUTE = 0.0
RULES = ("first", "deviation", "leading", "uniform")


@dataclass(frozen=True)
class Candidate:
    """A stale spliced token a rule of your own may pick (see `Recompute.rule`).

    Attributes:
        module: the module (its path; "" for the schema's own text) whose stored states hold it.
        offset: its index among that module's stored tokens.
        position: its position in the prompt (its rank there when gaps close).
        token: its token id.
    """

    module: str
    offset: int
    position: int
    token: int


Rule = Callable[[Sequence[Candidate], int], Iterable[int]]
"""A rule of your own: (candidates in position order, budget) -> indices of those to recompute."""


@dataclass(frozen=True)
class Recompute:
    """What to recompute when spliced states are stale (pass as `recompute=` anywhere a float goes).

    Attributes:
        fraction: at most this share of the prompt's spliced tokens is recomputed (0..1).
        rule: how stale tokens are picked (see the module docstring): one of `RULES`, or a `Rule`.
        probe_layer: the decoder layer "deviation" compares states at (clamped to the model's last).
        close_gaps: move later tokens to contiguous positions (rotating stored keys).
    """

    fraction: float
    rule: str | Rule = "first"
    probe_layer: int = 1
    close_gaps: bool = True

    def __post_init__(self):
        check_fraction(self.fraction)
        if not callable(self.rule) and self.rule not in RULES:
            raise PromptError(f"invalid recompute rule={self.rule!r:.80}: must be one of {', '.join(RULES)} "
                              "or a callable (candidates, budget) -> indices")
        if isinstance(self.probe_layer, bool) or not isinstance(self.probe_layer, int) or self.probe_layer < 0:
            raise PromptError(f"invalid recompute probe_layer={self.probe_layer!r:.80}: must be an int >= 0")


def check_fraction(value: object) -> float:
    """`value` as a float in [0, 1]; PromptError naming `recompute` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or not 0 <= value <= 1:
        raise PromptError(f"invalid recompute={value!r:.80}: must be a float in [0, 1] (the fraction of "
                          "spliced tokens to recompute) or a Recompute")
    return float(value)


def recomputes_all(policy: Recompute | None, tokens: PromptPlan, adapter) -> bool:
    """Whether `policy`'s prefill of the prompt `tokens` is the full prefill of its text, so that a prefix
    of it cached by an earlier request may stand in for it: every stale token recomputed, and every token
    at its rank (gaps closed by moving keys, or no gaps to close).

    NOTE: a model whose keys cannot move keeps the gaps: its prefill is not the full prefill of the text,
    and a kept prefix must never stand in for it, or the answer would depend on earlier requests.
    """
    if policy is None or policy.fraction < 1.0 or callable(policy.rule) or not policy.close_gaps:
        return False
    return _mover(adapter.model) is not None or tokens.positions == tuple(range(len(tokens.positions)))


def recompute_policy(value: object) -> Recompute | None:
    """The policy `recompute=value` asks for: None (splice as stored) for 0, else a `Recompute`."""
    if isinstance(value, Recompute):
        return value
    fraction = check_fraction(value)
    return Recompute(fraction) if fraction > 0 else None


@dataclass(frozen=True)
class _Token:
    position: int  # as planned (schema positions)
    token: int
    part: int      # index into the spliced parts; -1 for a token computed anyway
    offset: int    # index in its part


def _sequence(parts: list[KVStates], new_ids, new_positions) -> list[_Token]:
    seq = [_Token(p, t, i, j) for i, st in enumerate(parts) for j, (t, p) in
           enumerate(zip(st.token_ids, st.positions.tolist()))]
    seq += [_Token(p, t, -1, j) for j, (t, p) in enumerate(zip(new_ids, new_positions))]
    seq.sort(key=lambda x: x.position)
    assert all(a.position < b.position for a, b in zip(seq, seq[1:])), "two prompt tokens at one position"
    return seq


class _EncodeIndex:
    """Where each module token was encoded: its pass, and its index in that pass's full context."""

    def __init__(self, layout: SchemaLayout):
        self.passes = layout.passes
        self.where: dict[tuple[str, int], tuple[int, int]] = {}
        for q, p in enumerate(layout.passes):
            for k, (owner, pos) in enumerate(zip(p.owners, p.positions)):
                if owner is not None:
                    self.where.setdefault((owner, pos), (q, p.prefix_len + k))

    def lcp(self, q: int, seq: list[tuple[int, int]], memo: dict[int, int]) -> int:
        """Length of the common prefix of pass q's full context (prefix included) and `seq`."""
        if q not in memo:
            p = self.passes[q]
            n = 0 if p.parent is None else min(self.lcp(p.parent, seq, memo), p.prefix_len)
            if p.parent is None or n == p.prefix_len:
                for pair in zip(p.token_ids, p.positions):
                    if n >= len(seq) or seq[n] != pair:
                        break
                    n += 1
            memo[q] = n
        return memo[q]


_INDEXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_INDEX_LOCK = threading.Lock()


def _index(version) -> _EncodeIndex:
    with _INDEX_LOCK:
        index = _INDEXES.get(version)
        if index is None:
            index = _INDEXES[version] = _EncodeIndex(version.layout)
        return index


def _as_encoded(version, cached: tuple[str, ...], seq: list[_Token]) -> list[bool]:
    """Per prompt token: spliced and encoded after exactly the prompt's tokens before it."""
    index, memo = _index(version), {}
    pairs = [(t.token, t.position) for t in seq]
    out = []
    for i, t in enumerate(seq):
        found = index.where.get((cached[t.part], t.position)) if t.part >= 0 else None
        out.append(found is not None and found[1] == i and index.lcp(found[0], pairs, memo) > i)
    return out


def plan_blend(policy: Recompute | None, version, tokens: PromptPlan, parts: list[KVStates],
               adapter) -> Blend | None:
    """How a module prompt's spliced states are repaired under `policy`; None: splice them as stored."""
    if policy is None:
        return None
    seq = _sequence(parts, tokens.new_token_ids, tokens.new_positions)
    exact = _as_encoded(version, tokens.cached, seq)
    mover = _mover(adapter.model) if policy.close_gaps else None
    frame = list(range(len(seq))) if mover is not None else [t.position for t in seq]
    spliced = [i for i, t in enumerate(seq) if t.part >= 0]
    kept = [i for i in spliced if exact[i] and frame[i] == seq[i].position]
    if all(exact[i] for i in spliced):
        # Never touched. Only new tokens after a trailing gap may move down (no stored state moves).
        moved = any(frame[i] != t.position for i, t in enumerate(seq))
        return Blend(policy, mover, seq, frame, kept, [], shift_only=True) if moved and len(kept) == len(
            spliced) else None
    kept_set = set(kept)
    blend = Blend(policy, mover, seq, frame, kept, [i for i in spliced if i not in kept_set])
    if callable(policy.rule):
        blend.chosen = blend.ask_rule(tokens.cached)
    return blend


_MOVERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _mover(model) -> KeyMover | None:
    if model not in _MOVERS:
        _MOVERS[model] = key_mover(model)
    return _MOVERS[model]


@dataclass
class Blend:
    """One request's repair plan (made by `plan_blend`); `prefill` runs it.

    Attributes:
        policy: the request's `Recompute`.
        mover: moves stored keys (None: positions stay as planned).
        seq: every prompt token in position order.
        frame: the position each runs at (its rank when gaps close).
        kept: seq indices of spliced tokens reused as stored (exact, not moved).
        stale: seq indices of the other spliced tokens.
        shift_only: no stale states; only new tokens move.
        chosen: seq indices a rule of your own picked (`ask_rule`); None for the built-in rules.
    """

    policy: Recompute
    mover: KeyMover | None
    seq: list[_Token]
    frame: list[int]
    kept: list[int]
    stale: list[int]
    shift_only: bool = False
    chosen: list[int] | None = None

    def budget(self) -> tuple[list[int], list[int], int]:
        """Kept tokens and candidates (the last prompt token excluded: always computed), and how many
        candidates the policy's fraction allows."""
        last = len(self.seq) - 1  # its logits start the answer: always computed
        kept = [i for i in self.kept if i != last]
        cands = [i for i in self.stale if i != last]
        return kept, cands, min(len(cands), round(self.policy.fraction * (len(kept) + len(cands))))

    def ask_rule(self, modules: Sequence[str]) -> list[int]:
        """The candidates (seq indices) the policy's own rule picks; PromptError naming it if its answer is invalid."""
        _, cands, budget = self.budget()
        rule = self.policy.rule
        name = getattr(rule, "__qualname__", None) or repr(rule)
        shown = [Candidate(modules[self.seq[i].part], self.seq[i].offset, self.frame[i], self.seq[i].token)
                 for i in cands]
        try:
            answer = list(rule(shown, budget))
        except PromptCacheError:
            raise
        except Exception as e:
            raise PromptError(f"recompute rule {name:.80} failed: {type(e).__name__}: {e}"[:300]) from e
        bad = next((j for j in answer if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < len(cands)),
                   None)
        if bad is not None or len(set(answer)) != len(answer) or len(answer) > budget:
            raise PromptError(f"recompute rule {name:.80} returned {answer!r:.80}: must be distinct indices "
                              f"into its {len(cands)} candidates, at most the budget {budget}")
        return sorted(cands[j] for j in answer)

    def prefill(self, adapter, spec: CacheSpec, parts: list[KVStates]) -> Prefill:
        """Fill a request cache for the prompt and compute its first logits (see the module docstring)."""
        if self.shift_only:
            new = [i for i, t in enumerate(self.seq) if t.part < 0]
            return prefill_modules(adapter, spec, parts, [self.seq[i].token for i in new],
                                   [self.frame[i] for i in new], len(self.seq))
        kept, cands, budget = self.budget()
        cache = spec.new_cache(_runs(parts, self.seq, kept), spec.capacity)
        k_pos = torch.empty(spec.capacity, dtype=torch.long, device=spec.device)
        k_pos[:len(kept)] = torch.tensor([self.frame[i] for i in kept], dtype=torch.long)
        fresh = None
        if self.chosen is not None:
            chosen = self.chosen
        elif self.policy.rule == "deviation" and 0 < budget < len(cands):
            scores, fresh = self._probe(adapter, cache, k_pos, parts, len(kept), cands)
            chosen = pick("deviation", cands, budget, scores=scores)
        else:
            chosen = pick(self.policy.rule, cands, budget, run_starts=_run_starts(self.seq, cands))
        chosen_set = set(chosen)
        reuse = [j for j, i in enumerate(cands) if i not in chosen_set]  # indices into cands
        skip = set(kept) | {cands[j] for j in reuse}
        queries = [i for i in range(len(self.seq)) if i not in skip]
        logits, n = self._fill(adapter, cache, k_pos, parts, len(kept), cands, reuse, queries, fresh)
        # nothing stale left and every slot at its rank: the full prefill's states (kept ones are already)
        exact = not reuse and n == len(self.seq) and bool(
            torch.equal(k_pos[:n].cpu(), torch.arange(n, dtype=k_pos.dtype)))
        return Prefill(cache, k_pos, n, len(self.seq), spec.capacity - n, logits[0, -1],
                       cached_tokens=n - len(queries), recomputed_tokens=len(chosen), exact=exact)

    def _fill(self, adapter, cache, k_pos: torch.Tensor, parts: list[KVStates], at: int, cands: list[int],
              reuse: list[int], queries: list[int], fresh) -> tuple[torch.Tensor, int]:
        """Write the reused stale states (`reuse`: indices into `cands`) and run `queries` after slot `at`.

        When the queries form at most `MAX_QUERY_RUNS` runs in position order, runs of reused and
        of computed tokens go in alternately (the cache stays in position order, no position mask);
        else every reused state goes first and all queries run in one masked forward. Returns the
        last forward's logits and the slots filled.
        """
        order = sorted([(self.frame[cands[j]], False, j) for j in reuse] + [(self.frame[i], True, i) for i in queries])
        runs = [[x[2] for x in run] for _, run in itertools.groupby(order, key=lambda x: x[1])]
        kinds = [computed for computed, _ in itertools.groupby(order, key=lambda x: x[1])]
        if sum(kinds) > MAX_QUERY_RUNS:
            runs, kinds = [reuse, queries], [False, True]
        logits = None
        for run, computed in zip(runs, kinds):
            if not run:
                continue
            if computed:
                k_pos[at:at + len(run)] = torch.tensor([self.frame[i] for i in run], dtype=torch.long)
                ids = torch.tensor([[self.seq[i].token for i in run]], dtype=torch.long, device=k_pos.device)
                logits = run_chunks(adapter, ids, k_pos, at, cache)
                at += len(run)
            else:
                k_pos[at:at + len(run)] = torch.tensor([self.frame[cands[j]] for j in run], dtype=torch.long)
                at = self._write_reused(cache, parts, at, [cands[j] for j in run], fresh, run)
        return logits, at

    def _probe(self, adapter, cache, k_pos: torch.Tensor, parts: list[KVStates], n_kept: int,
               cands: list[int]) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Deviation of each candidate at the probe layer, and every candidate's exact states of layers 0..probe."""
        layer = min(self.policy.probe_layer, adapter.num_layers - 1)
        kept = set(self.kept) - {len(self.seq) - 1}
        rest = [i for i in range(len(self.seq)) if i not in kept]
        k_pos[n_kept:n_kept + len(rest)] = torch.tensor([self.frame[i] for i in rest], dtype=torch.long)
        ids = torch.tensor([[self.seq[i].token for i in rest]], dtype=torch.long, device=k_pos.device)
        chunk = _prefill.CHUNK
        for a in range(0, len(rest), chunk):
            b = min(a + chunk, len(rest))
            probe_forward(adapter, ids[:, a:b], k_pos[n_kept + a:n_kept + b], k_pos[:n_kept + b], cache, layer)
        slot = {i: n_kept + j for j, i in enumerate(rest)}
        slots = torch.tensor([slot[i] for i in cands], dtype=torch.long, device=k_pos.device)
        fresh = [cache.read(la, slots) for la in range(layer + 1)]
        cache.fill_to(n_kept)
        keys, values = self._stored(parts, cands, layer, k_pos.device)
        dk = (fresh[layer][0] - keys).float().pow(2).sum(dim=(0, 1, 3))  # [cands]
        dv = (fresh[layer][1] - values).float().pow(2).sum(dim=(0, 1, 3))
        norm_k = keys.float().pow(2).sum(dim=(0, 1, 3)).mean().clamp(min=1e-12)
        norm_v = values.float().pow(2).sum(dim=(0, 1, 3)).mean().clamp(min=1e-12)
        return dk / norm_k + dv / norm_v, fresh

    def _stored(self, parts: list[KVStates], idx: list[int], layer: int, device: torch.device, gather=None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored keys (moved to their frame positions) and values of seq tokens `idx` at `layer`, on `device`.

        NOTE: parts may sit in host memory (the host tier) while the model runs on a GPU.
        """
        ref = parts[0].keys[layer]
        shape = (ref.shape[0], ref.shape[1], len(idx), ref.shape[3])
        keys = torch.empty(shape, dtype=ref.dtype, device=device)
        values = torch.empty(shape, dtype=ref.dtype, device=device)
        gather = gather or self._gather(idx, device)
        for part, (src, dst) in gather.items():
            st, at = parts[part], src.to(parts[part].device)
            keys[:, :, dst] = st.keys[layer].index_select(2, at).to(device, non_blocking=True)
            values[:, :, dst] = st.values[layer].index_select(2, at).to(device, non_blocking=True)
        delta = torch.tensor([self.frame[i] - self.seq[i].position for i in idx], dtype=torch.long)
        if self.mover is not None and bool(delta.any()):
            keys = self.mover.move(keys, delta, layer)
        return keys, values

    def _gather(self, idx: list[int], device) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Per part: (offsets in the part, columns in the output) of seq tokens `idx`."""
        by_part: dict[int, tuple[list[int], list[int]]] = {}
        for j, i in enumerate(idx):
            offs, cols = by_part.setdefault(self.seq[i].part, ([], []))
            offs.append(self.seq[i].offset)
            cols.append(j)
        return {part: (torch.tensor(offs, dtype=torch.long, device=device),
                       torch.tensor(cols, dtype=torch.long, device=device)) for part, (offs, cols) in by_part.items()}

    def _write_reused(self, cache, parts: list[KVStates], at: int, idx: list[int], fresh, cols: list[int]) -> int:
        """Write reused stale tokens `idx` into slots from `at` (probed layers: their exact states); the end."""
        n = len(idx)
        if n:
            pick = torch.tensor(cols, dtype=torch.long, device=cache.block.device)
            gather = self._gather(idx, cache.block.device)
            for la in range(len(cache.layers)):
                if fresh is not None and la < len(fresh):
                    keys, values = fresh[la][0].index_select(2, pick), fresh[la][1].index_select(2, pick)
                else:
                    keys, values = self._stored(parts, idx, la, cache.block.device, gather)
                cache.write(la, at, keys, values)
        cache.fill_to(at + n)
        return at + n


def _runs(parts: list[KVStates], seq: list[_Token], idx: list[int]) -> list[KVStates]:
    """Seq tokens `idx` (spliced, in order) as slices of their parts: one per run of consecutive offsets."""
    out, start = [], None
    for j, i in enumerate(idx):
        t = seq[i]
        if start is None:
            start = t
        nxt = seq[idx[j + 1]] if j + 1 < len(idx) else None
        if nxt is None or nxt.part != t.part or nxt.offset != t.offset + 1:
            out.append(parts[t.part].slice(start.offset, t.offset + 1))
            start = None
    return out


def _run_starts(seq: list[_Token], cands: list[int]) -> list[bool]:
    """Per candidate: does a run of stale tokens start there (another part, a kept or new token
    before it, or a position jump)?"""
    return [j == 0 or cands[j - 1] != i - 1 or seq[cands[j - 1]].part != seq[i].part
            or seq[cands[j - 1]].position + 1 != seq[i].position for j, i in enumerate(cands)]


def pick(rule: str, cands: list[int], budget: int, *, scores: torch.Tensor | None = None,
         run_starts: list[bool] | None = None) -> list[int]:
    """The `budget` candidates (prompt indices, ascending) that `rule` recomputes, ascending.

    Args:
        rule: one of `RULES`; "deviation" needs `scores` (one per candidate, higher first; ties:
            earlier first), "leading" needs `run_starts` (else every candidate starts a run).
        cands: the candidates.
        budget: how many to pick.
    """
    if budget <= 0:
        return []
    if budget >= len(cands):
        return list(cands)
    if rule == "deviation" and scores is not None:
        order = torch.sort(scores, descending=True, stable=True).indices[:budget].tolist()
        return sorted(cands[j] for j in order)
    if rule == "uniform":
        return sorted({cands[(m * len(cands)) // budget] for m in range(budget)})
    if rule == "leading":  # offsets from the start of each run, round-robin over runs
        offset, ranked = 0, []
        for j, start in enumerate(run_starts or [True] * len(cands)):
            offset = 0 if start else offset + 1
            ranked.append((offset, j))
        return sorted(cands[j] for _, j in sorted(ranked)[:budget])
    return cands[:budget]  # "first" (and "deviation" without scores)
