"""The benchmark-only oracle rules (benchmarks/oracles.py) and the dtype floor of quality.py."""

from __future__ import annotations

import json

import pytest
import torch

import promptcache as pc
from benchmarks import oracles, quality
from promptcache.engine.recompute import Candidate, Recompute

SCHEMA = """<schema name="o">
  <system>You answer questions about the documents below.</system>
  <module name="a">The first document talks about the city, its hotel and a long trip by the sea.</module>
  <module name="b">The second document lists what people said about water, air and the earth.</module>
  <module name="c">The last document is about a garden with roses, a pond and an old stone wall.</module>
</schema>"""
PROMPT = '<prompt schema="o"><b/><c/><user>What is it about?</user></prompt>'  # `a` skipped: b and c stale


def engine_for(arch: str) -> pc.Engine:
    model, tok = pc.testing.tiny_model(arch, seed=0, num_layers=4)
    engine = pc.Engine(model, tok, progress=False, prefix_cache=False)
    engine.add_schema(SCHEMA)
    return engine


def candidates(engine, prompt: str) -> list[Candidate]:
    seen = []
    with engine.prefill(engine.plan(prompt), recompute=Recompute(1.0, rule=lambda c, b: seen.extend(c) or [])):
        pass
    return seen


def slot_states(pre) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per prompt position: (key, value) of every layer, from a prefill's cache slots."""
    positions = pre.key_positions[:pre.length].tolist()
    return {p: [(la.keys[0, :, s].clone(), la.values[0, :, s].clone()) for la in pre.cache.layers]
            for s, p in enumerate(positions)}


def test_a_ranking_is_made_once_and_serves_every_budget():
    calls = []
    cands = [Candidate("a", k, k, 5) for k in range(4)]
    rule = oracles.Ranked(lambda c: calls.append(len(c)) or [2, 0, 3, 1])
    assert rule(cands, 2) == [2, 0] and rule(cands, 4) == [2, 0, 3, 1] and rule(cands, 0) == []
    assert calls == [4]
    with pytest.raises(AssertionError):
        rule(cands[:3], 1)


def test_the_document_oracle_goes_to_the_answers_document_first():
    cands = [Candidate(m, k, p, 7) for p, (m, k) in enumerate([("d0", 5), ("d0", 6), ("d2", 0), ("d2", 1), ("", 9)])]
    assert oracles.document_first("d2")(cands, 3) == [2, 3, 0]
    assert oracles.document_first("d9")(cands, 2) == [0, 1]


@pytest.mark.parametrize("arch", ["llama", "mpt"])
def test_the_deviation_oracle_ranks_by_the_distance_the_engine_itself_leaves(arch):
    """Its ranking equals one read off the engine's own caches: stale states as the engine reuses them
    (moved, recompute 0) against the same tokens recomputed (recompute 1: the full prefill's states)."""
    engine = engine_for(arch)
    cands = candidates(engine, PROMPT)
    full = oracles.full_states(engine, PROMPT)
    order = oracles.deviation_oracle(engine, "o", full)(cands, len(cands))
    plan = engine.plan(PROMPT)
    with engine.prefill(plan, recompute=Recompute(0.0)) as stale, engine.prefill(plan, recompute=1.0) as exact:
        reused, truth = slot_states(stale), slot_states(exact)
    scale = [(torch.stack([truth[p][la][0] for p in truth]).pow(2).sum((1, 2)).mean(),
              torch.stack([truth[p][la][1] for p in truth]).pow(2).sum((1, 2)).mean()) for la in range(4)]
    score = [sum(float((truth[c.position][la][0] - reused[c.position][la][0]).pow(2).sum() / scale[la][0]
                       + (truth[c.position][la][1] - reused[c.position][la][1]).pow(2).sum() / scale[la][1])
                 for la in range(4)) for c in cands]
    assert max(score) > 0, "no stale token moved: nothing to rank"
    expected = sorted(range(len(cands)), key=lambda j: -score[j])
    assert [score[j] for j in order] == pytest.approx([score[j] for j in expected], rel=1e-4, abs=1e-9)


def test_the_marginal_oracle_picks_the_single_token_that_helps_most():
    engine = engine_for("llama")
    plan = engine.plan(PROMPT, enable_cache=False)
    with engine.prefill(plan) as pre:
        full = pre.logits.float().log_softmax(-1)
    cands = candidates(engine, PROMPT)
    rule = oracles.marginal_oracle(engine, PROMPT, full)

    def kl(pick: list[int]) -> float:
        with engine.prefill(engine.plan(PROMPT), recompute=Recompute(1.0, rule=lambda c, b: pick)) as pre:
            cached = pre.logits.float().log_softmax(-1)
        return float((full.exp() * (full - cached)).sum())

    singles = [kl([j]) for j in range(len(cands))]
    order = rule(cands, len(cands))
    assert sorted(order) == list(range(len(cands)))
    assert singles[order[0]] == pytest.approx(min(singles), abs=1e-9) and max(singles) > min(singles)


def test_quick_run_with_the_oracles_and_a_floor(tmp_path):
    rows = quality.main(["--quick", "--model", "llama", "--setups", "skipped,longbench-multi", "--fractions", "0,0.5",
                         "--rules", "first,oracle,marginal", "--floor-dtype", "float32", "--no-scorer",
                         "--out", str(tmp_path)])
    assert [(r["setup"], r["rule"]) for r in rows] == [
        ("skipped", "-"), ("skipped", "first"), ("skipped", "oracle"), ("skipped", "marginal"),
        ("longbench-multi", "-"), ("longbench-multi", "first"), ("longbench-multi", "oracle")]
    budgets = {(r["setup"], r["rule"]): r["recomputed"] for r in rows}
    assert budgets["skipped", "oracle"] == budgets["skipped", "first"] == budgets["skipped", "marginal"] > 0
    payload = json.loads((tmp_path / "quality.json").read_text())
    # the same dtype twice: the floor is exact, so it measures the precision change and nothing else
    assert [(f["setup"], f["dtype"], f["agreement"], f["mean_kl"]) for f in payload["floor"]] == [
        ("skipped", "float32", 1.0, 0.0), ("longbench-multi", "float32", 1.0, 0.0)]
    oracle = next(r for r in rows if r["rule"] == "oracle") | {"fraction": 0.2, "agreement": 1.0}
    oracle["acc_cached"] = oracle["acc_full"]
    assert quality.targets([oracle]) == {"skipped": None}


def test_a_floor_in_another_dtype_is_measured(tmp_path):
    quality.main(["--quick", "--model", "llama", "--setups", "skipped", "--fractions", "0", "--floor-dtype",
                  "bfloat16", "--no-scorer", "--out", str(tmp_path)])
    (floor,) = json.loads((tmp_path / "quality.json").read_text())["floor"]
    assert floor["dtype"] == "bfloat16" and floor["n"] == 4 and floor["mean_kl"] > 0
