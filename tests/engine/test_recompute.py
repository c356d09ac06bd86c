"""Selective recompute: full recompute is the full prefill; exact prompts are never touched; partial
recompute counts what it did, moves toward the full prefill, keeps stored states and threads intact."""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import promptcache as pc
from promptcache.engine import recompute as recompute_module
from promptcache.engine.recompute import Recompute, pick
from promptcache.markup.layout import encode_text
from promptcache.models.relocate import key_mover

from .conftest import ARCHS, DOCS, make_engine

SCHEMA = """<schema name="g">
  <system>You answer questions about the documents below.</system>
  <module name="a">The first document talks about the city, its hotel and a long trip by the sea.</module>
  <module name="b">The second document lists what people said about water, air and the earth.</module>
  <union>
    <module name="brief">Answer briefly.</module>
    <module name="detailed">Answer in detail, citing the document each fact comes from, step by step.</module>
  </union>
  <module name="trip">The trip lasts <parameter name="days" length="{n}" scaffold="seven"/> days, by train.</module>
  <module name="c">The last document is about a garden with roses, a pond and an old stone wall.</module>
</schema>"""
EXACT = '<a/><b/><detailed/><trip days="seven"/><c/>'
STALE = {"skipped": "<a/><c/>", "union": '<a/><b/><brief/><trip days="seven"/><c/>',
         "parameter": '<a/><b/><detailed/><trip days="nine"/><c/>', "trailing": "<a/><b/>"}


def prompt(selection: str) -> str:
    return f'<prompt schema="g">{selection}<user>What is it about?</user></prompt>'


def add(engine) -> None:
    engine.add_schema(SCHEMA.format(n=len(encode_text(engine.tokenizer, "seven"))))


@functools.cache
def deep(arch: str):
    return pc.testing.tiny_model(arch, seed=0, num_layers=4)


def deep_engine(arch: str, **kw) -> pc.Engine:
    model, tok = deep(arch)
    engine = pc.Engine(model, tok, progress=False, **kw)
    add(engine)
    return engine


def first_logits(engine, text: str, recompute=None, cached: bool = True) -> tuple[torch.Tensor, int]:
    with engine.prefill(engine.plan(text, enable_cache=cached), recompute=recompute) as pre:
        return pre.logits.clone(), pre.recomputed_tokens


@pytest.mark.parametrize("case", sorted(STALE))
def test_full_recompute_is_the_full_prefill(engine, case):
    add(engine)
    text = prompt(STALE[case])
    full = engine.generate(text, max_new_tokens=12, enable_cache=False)
    logits, recomputed = first_logits(engine, text, 1.0)  # before generate keeps its states for the next
    cached = engine.generate(text, max_new_tokens=12, recompute=1.0)
    assert cached.token_ids == full.token_ids and len(set(full.token_ids)) > 1
    assert cached.usage.cached_tokens + cached.usage.recomputed_tokens == engine.plan(text).tokens.cached_token_count
    torch.testing.assert_close(logits, first_logits(engine, text, cached=False)[0], rtol=1e-4, atol=1e-4)
    assert recomputed == cached.usage.recomputed_tokens > 0
    spliced, _ = first_logits(engine, text, 0.0)
    assert (spliced - logits).abs().max() > 1e-4, "splicing as stored must differ here, or the test shows nothing"


@pytest.mark.parametrize("case", ["skipped", "union", "parameter"])
def test_a_full_recompute_is_kept_for_the_next_request_of_the_same_text(engine, case):
    add(engine)
    text = prompt(STALE[case])
    other = f'<prompt schema="g">{STALE[case]}<user>And who wrote it?</user></prompt>'
    first = engine.generate(text, max_new_tokens=8, recompute=1.0)
    assert first.usage.recomputed_tokens > 0
    for question in (text, other):
        again = engine.generate(question, max_new_tokens=8, recompute=1.0)
        assert again.token_ids == engine.generate(question, max_new_tokens=8, enable_cache=False).token_ids
        assert again.usage.recomputed_tokens == 0 and again.usage.modules_hit == ()
        assert again.usage.cached_tokens >= engine.plan(question).tokens.cached_token_count
    # another tenant's request computes its own
    assert engine.generate(text, max_new_tokens=8, recompute=1.0, namespace="b").usage.recomputed_tokens > 0


def test_only_a_full_recompute_is_kept_and_only_a_full_recompute_reuses_it(engine):
    add(engine)
    text = prompt(STALE["union"])
    stale = engine.generate(text, max_new_tokens=8, recompute=1.0, namespace="count").usage.recomputed_tokens
    partial = engine.generate(text, max_new_tokens=8, recompute=0.2)
    assert 0 < partial.usage.recomputed_tokens < stale
    assert engine.generate(text, max_new_tokens=8, recompute=1.0).usage.recomputed_tokens > 0, \
        "a partial recompute's states are approximate: nothing of them may stand in for the full prefill"
    again = engine.generate(text, max_new_tokens=8, recompute=0.2)
    assert again.usage.recomputed_tokens == partial.usage.recomputed_tokens and again.token_ids == partial.token_ids
    exact = prompt(EXACT)
    assert engine.generate(exact, max_new_tokens=8).usage.cache_write_tokens == 0, "exact splices stay in the store"


def test_without_a_prefix_cache_a_full_recompute_computes_every_time(arch):
    engine = make_engine(arch, prefix_cache=False)
    add(engine)
    text = prompt(STALE["skipped"])
    first = engine.generate(text, max_new_tokens=8, recompute=1.0)
    second = engine.generate(text, max_new_tokens=8, recompute=1.0)
    assert second.token_ids == first.token_ids and second.usage.recomputed_tokens == first.usage.recomputed_tokens > 0


def test_exact_selection_is_never_touched(engine):
    add(engine)
    text = prompt(EXACT)
    assert engine.plan(text).tokens.positions == tuple(range(len(engine.plan(text).token_ids)))
    plain, _ = first_logits(engine, text, 0.0)
    for recompute in (0.15, 1.0, Recompute(0.5, rule="leading")):
        logits, recomputed = first_logits(engine, text, recompute)
        assert torch.equal(logits, plain) and recomputed == 0
    out = engine.generate(text, max_new_tokens=4, recompute=1.0)
    assert out.usage.recomputed_tokens == 0 and out.usage.cached_tokens == engine.plan(text).tokens.cached_token_count


SHORT_SCAFFOLD = """<schema name="s">
  <system>You answer questions about the documents below.</system>
  <module name="a">The first document talks about the city, its hotel and a long trip by the sea.</module>
  <union scaffold="brief">
    <module name="brief">Answer briefly.</module>
    <module name="detailed">Answer in detail, citing the document each fact comes from, step by step.</module>
  </union>
  <module name="c">The last document is about a garden with roses, a pond and an old stone wall.</module>
  <module name="d">The trip lasts <parameter name="days" length="{n}" scaffold="seven"/> days.</module>
</schema>"""


def test_a_gap_the_schema_encoded_is_kept_and_closed_only_when_states_are_stale(engine):
    # brief, the scaffold, is shorter than its union: the schema itself has a gap after it.
    engine.add_schema(SHORT_SCAFFOLD.format(n=len(encode_text(engine.tokenizer, "seven"))))
    as_encoded = '<prompt schema="s"><a/><brief/><c/><d days="seven"/><user>Why?</user></prompt>'
    plain, _ = first_logits(engine, as_encoded, 0.0)
    logits, recomputed = first_logits(engine, as_encoded, 1.0)
    assert torch.equal(logits, plain) and recomputed == 0
    # Another argument: d is stale, c is not, but c sits after the gap: moved, it must be recomputed too.
    changed = as_encoded.replace('days="seven"', 'days="nine"')
    full = engine.generate(changed, max_new_tokens=10, enable_cache=False)
    assert engine.generate(changed, max_new_tokens=10, recompute=1.0).token_ids == full.token_ids
    logits, recomputed = first_logits(engine, changed, 1.0)
    torch.testing.assert_close(logits, first_logits(engine, changed, cached=False)[0], rtol=1e-4, atol=1e-4)


def test_a_trailing_gap_moves_only_the_new_tokens(engine):
    engine.add_schema(DOCS)
    text = '<prompt schema="docs"><intro/><code/>What is the answer?</prompt>'  # notes skipped: a gap at the end
    full, _ = first_logits(engine, text, cached=False)
    logits, recomputed = first_logits(engine, text, Recompute(0.5))
    assert recomputed == 0
    torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4)
    assert (first_logits(engine, text, 0.0)[0] - full).abs().max() > 1e-4
    out = engine.generate(text, max_new_tokens=10, recompute=0.5)
    assert out.token_ids == engine.generate(text, max_new_tokens=10, enable_cache=False).token_ids
    assert out.usage.cached_tokens == engine.plan(text).tokens.cached_token_count


@pytest.mark.parametrize("arch", ["llama", "falcon", "mpt"])
@pytest.mark.parametrize("rule", ["deviation", "leading", "first", "uniform"])
def test_partial_recompute_counts_its_tokens(arch, rule):
    engine = deep_engine(arch)
    text = prompt(STALE["union"])
    spliced = engine.plan(text).tokens.cached_token_count
    stale = engine.generate(text, max_new_tokens=1, recompute=1.0).usage.recomputed_tokens
    for fraction in (0.05, 0.2, 0.5):
        usage = engine.generate(text, max_new_tokens=1, recompute=Recompute(fraction, rule=rule)).usage
        assert usage.recomputed_tokens == min(stale, round(fraction * spliced))
        assert usage.cached_tokens + usage.recomputed_tokens == spliced


@pytest.mark.parametrize("arch", ["llama", "falcon", "mpt", "qwen2"])
def test_partial_recompute_moves_toward_the_full_prefill(arch):
    engine = deep_engine(arch)
    for case in ("skipped", "union", "parameter"):
        text = prompt(STALE[case])
        full, _ = first_logits(engine, text, cached=False)
        gaps = [float((first_logits(engine, text, f)[0] - full).abs().max()) for f in (0.0, 0.15, 1.0)]
        assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-4, (case, gaps)


@pytest.mark.parametrize("arch", ["llama", "mpt"])
def test_probe_states_replace_stale_ones_up_to_the_probe_layer(arch):
    # Probing through the last layer computes every layer in the prompt's context: exact at any fraction.
    engine = deep_engine(arch)
    text = prompt(STALE["skipped"])
    full, _ = first_logits(engine, text, cached=False)
    exact, n = first_logits(engine, text, Recompute(0.1, rule="deviation", probe_layer=3))
    torch.testing.assert_close(exact, full, rtol=1e-4, atol=1e-4)
    partial, m = first_logits(engine, text, Recompute(0.1, rule="deviation", probe_layer=1))
    assert n == m > 0 and (partial - full).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_moved_keys_equal_keys_computed_there(arch):
    # Layer 0's keys depend on a token and its position only: moving them must give the keys of
    # the same tokens encoded at the new position.
    model, tok = deep(arch)
    engine = pc.Engine(model, tok, progress=False)
    text = "The last document is about a garden with roses, a pond and an old stone wall."
    near = engine.add_schema(f'<schema name="near">Hi.<module name="m">{text}</module></schema>').module("m")
    far = engine.add_schema(f'<schema name="far">Hello there, my dear old friend, hello again. '
                            f'<module name="m">{text}</module></schema>').module("m")
    assert far.start > near.start and far.token_ids == near.token_ids
    k_near, k_far = engine.module_states("near", "m").keys[0], engine.module_states("far", "m").keys[0]
    delta = torch.full((len(near.token_ids),), far.start - near.start, dtype=torch.long)
    moved = key_mover(model).move(k_near, delta)
    torch.testing.assert_close(moved, k_far, rtol=1e-5, atol=1e-5)
    back = key_mover(model).move(k_far, -delta)
    torch.testing.assert_close(back, k_near, rtol=1e-5, atol=1e-5)
    if arch != "mpt":  # RoPE: the keys do carry their position
        assert (k_near - k_far).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("rule", ["first", "deviation"])
def test_every_slot_holds_its_tokens_layer0_state_at_its_position(arch, rule):
    # Layer 0's keys and values depend on a token and its position only: in the request cache each
    # slot must hold the full prefill's at the slot's position (kept, moved or recomputed alike).
    engine = deep_engine(arch)
    text = prompt(STALE["skipped"])
    with engine.prefill(engine.plan(text, enable_cache=False)) as full:
        fk, fv = full.cache.layers[0].keys.clone(), full.cache.layers[0].values.clone()
    with engine.prefill(engine.plan(text), recompute=Recompute(0.1, rule=rule)) as pre:
        assert pre.recomputed_tokens > 0 and pre.next_position == pre.length == fk.shape[2]
        pos = pre.key_positions[:pre.length]
        assert sorted(pos.tolist()) == list(range(pre.length))
        torch.testing.assert_close(pre.cache.layers[0].keys[:, :, :pre.length], fk[:, :, pos], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pre.cache.layers[0].values[:, :, :pre.length], fv[:, :, pos], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "mpt"])
def test_run_by_run_filling_equals_one_masked_forward(arch, monkeypatch):
    engine = deep_engine(arch)
    for rule in ("first", "uniform", "deviation"):
        for case in ("skipped", "union"):
            text, recompute = prompt(STALE[case]), Recompute(0.2, rule=rule)
            monkeypatch.setattr(recompute_module, "MAX_QUERY_RUNS", 0)  # all reused states, one masked forward
            masked, n = first_logits(engine, text, recompute)
            monkeypatch.setattr(recompute_module, "MAX_QUERY_RUNS", 10**6)  # runs in position order, no mask
            ordered, m = first_logits(engine, text, recompute)
            assert n == m > 0
            torch.testing.assert_close(ordered, masked, rtol=1e-4, atol=1e-4)


def test_rules_pick_as_documented():
    cands = [3, 4, 5, 6, 10, 11, 12, 13]
    assert pick("first", cands, 3) == [3, 4, 5]
    assert pick("uniform", cands, 4) == [3, 5, 10, 12]
    starts = [True, False, False, False, True, False, False, False]
    assert pick("leading", cands, 4, run_starts=starts) == [3, 4, 10, 11]
    scores = torch.tensor([0.1, 0.9, 0.2, 0.9, 0.0, 0.5, 0.3, 0.1])
    assert pick("deviation", cands, 3, scores=scores) == [4, 6, 11]
    assert pick("deviation", cands, 0, scores=scores) == [] and pick("leading", cands, 9) == cands


def snapshot(engine) -> dict:
    return {key: tuple(t.clone() for t in (*st.keys, *st.values, st.positions))
            for key in engine.store.keys() for st in [engine.store.get(key)]}


JOBS = [(prompt(STALE["union"]), Recompute(0.3, rule="deviation")), (prompt(STALE["skipped"]), 1.0),
        (prompt(STALE["parameter"]), Recompute(0.3, rule="leading")), (prompt(EXACT), 0.5),
        (prompt(STALE["union"]), 0.0), (prompt(STALE["trailing"]), Recompute(0.2)),
        (prompt(STALE["skipped"]), Recompute(0.2, rule="uniform"))]


@pytest.mark.parametrize("arch", ["llama", "mpt"])
def test_threads_equal_serial_and_stored_states_stay(arch):
    engine = deep_engine(arch)

    def run(job) -> tuple:
        out = engine.generate(job[0], max_new_tokens=6, recompute=job[1])
        return out.token_ids, out.usage.recomputed_tokens

    first = [run(job) for job in JOBS]
    serial = [run(job) for job in JOBS]  # a full recompute's states are kept: from now on its requests reuse them
    assert [tokens for tokens, _ in serial] == [tokens for tokens, _ in first]
    before = snapshot(engine)
    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(run, JOBS * 3)) == serial * 3
    after = snapshot(engine)
    assert after.keys() == before.keys() and before
    for key, tensors in before.items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, after[key], strict=True)), key


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), True, "0.2", None, [0.1]])
def test_bad_recompute_values_are_refused_by_name(bad):
    engine = make_engine("llama")
    add(engine)
    if bad is not None:
        with pytest.raises(pc.PromptError, match="recompute"):
            pc.Engine(*deep("llama"), progress=False, recompute=bad)
        with pytest.raises(pc.PromptError, match="recompute"):
            engine.generate(prompt(STALE["union"]), max_new_tokens=1, recompute=bad)
        with pytest.raises(pc.PromptError, match="recompute"):
            list(engine.stream(prompt(STALE["union"]), max_new_tokens=1, recompute=bad))
        with pytest.raises(pc.PromptError, match="recompute"):
            engine.prefill(engine.plan("plain text"), recompute=bad)
    with pytest.raises(pc.PromptError, match="rule"):
        Recompute(0.1, rule="random")
    with pytest.raises(pc.PromptError, match="probe_layer"):
        Recompute(0.1, probe_layer=-1)


def test_engine_default_and_request_override():
    text = prompt(STALE["skipped"])
    full = deep_engine("llama").generate(text, max_new_tokens=8, enable_cache=False)
    eager, lazy = deep_engine("llama", recompute=1.0), deep_engine("llama", recompute=0.0)
    assert eager.generate(text, max_new_tokens=8).token_ids == full.token_ids
    assert eager.generate(text, max_new_tokens=8, recompute=0).usage.recomputed_tokens == 0
    assert lazy.generate(text, max_new_tokens=8).usage.recomputed_tokens == 0
    chunks = list(lazy.stream(text, max_new_tokens=8, recompute=1.0))
    assert chunks[-1].usage.recomputed_tokens > 0
    assert "".join(c.text for c in chunks) == full.text
    plain = lazy.generate("plain text, no modules", max_new_tokens=2, recompute=1.0)
    assert plain.usage.recomputed_tokens == 0


TIERS = [("cpu", {}), ("cpu", {"device_budget_bytes": 0})]
if torch.cuda.is_available():
    TIERS += [("cuda", {}), ("cuda", {"device_budget_bytes": 0})]  # host tier: states in pinned host memory


@pytest.mark.parametrize(("device", "budget"), TIERS)
def test_recompute_from_every_tier_and_device(device, budget):
    model, tok = pc.testing.tiny_model("llama", seed=0, num_layers=4)  # its own copy: .to() moves in place
    engine = pc.Engine(model, tok, device=device, progress=False, **budget)
    add(engine)
    for case in ("skipped", "union"):
        text = prompt(STALE[case])
        full = engine.generate(text, max_new_tokens=8, enable_cache=False).token_ids
        assert engine.generate(text, max_new_tokens=8, recompute=1.0).token_ids == full
        for recompute in (Recompute(0.2, rule="deviation"), 0.2):
            assert engine.generate(text, max_new_tokens=8, recompute=recompute).usage.recomputed_tokens > 0


def test_response_cache_keys_on_recompute(tmp_path):
    engine = deep_engine("llama", response_cache_dir=tmp_path, recompute=0.0)
    text = prompt(STALE["union"])
    engine.generate(text, max_new_tokens=4)
    assert engine.generate(text, max_new_tokens=4).usage.response_cached
    again = engine.generate(text, max_new_tokens=4, recompute=1.0)
    assert not again.usage.response_cached and again.usage.recomputed_tokens > 0
    assert engine.generate(text, max_new_tokens=4, recompute=1.0).usage.response_cached


@pytest.mark.parametrize("arch", ["llama", "mpt"])
def test_a_rule_of_your_own_sees_the_candidates_and_is_obeyed(arch):
    engine = deep_engine(arch)
    text = prompt(STALE["skipped"])
    plan, seen = engine.plan(text), []

    def uniform(cands, budget):  # the built-in "uniform", through the public seam
        seen.append((list(cands), budget))
        return pick("uniform", list(range(len(cands))), budget)

    own, n = first_logits(engine, text, Recompute(0.2, rule=uniform))
    builtin, m = first_logits(engine, text, Recompute(0.2, rule="uniform"))
    first, _ = first_logits(engine, text, Recompute(0.2, rule="first"))
    torch.testing.assert_close(own, builtin, rtol=1e-5, atol=1e-5)
    assert n == m > 0 and (own - first).abs().max() > 1e-4, "uniform must differ from first here"
    (cands, budget), = seen
    assert budget == n and len(cands) > budget
    assert [c.position for c in cands] == sorted({c.position for c in cands})
    assert all(plan.token_ids[c.position] == c.token for c in cands)  # positions are the full prefill's
    assert {c.module for c in cands} <= set(plan.tokens.cached) and "c" in {c.module for c in cands}
    everything, k = first_logits(engine, text, Recompute(1.0, rule=lambda cands, budget: range(len(cands))))
    torch.testing.assert_close(everything, first_logits(engine, text, cached=False)[0], rtol=1e-4, atol=1e-4)
    assert k == len(cands)


def broken(cands, budget):
    raise KeyError("no such module")


@pytest.mark.parametrize("rule", [lambda c, b: [len(c)], lambda c, b: [0, 0], lambda c, b: [True],
                                  lambda c, b: range(b + 1), lambda c, b: ["0"], broken])
def test_a_rule_of_your_own_that_answers_wrong_is_refused_by_name_and_the_engine_goes_on(rule):
    engine = deep_engine("llama", response_cache_dir=None)
    text = prompt(STALE["union"])
    expected = engine.generate(text, max_new_tokens=4, recompute=0.2).token_ids
    for _ in range(3):
        with pytest.raises(pc.PromptError, match="recompute rule .*(broken|lambda)"):
            engine.generate(text, max_new_tokens=4, recompute=Recompute(0.2, rule=rule))
    assert engine.generate(text, max_new_tokens=4, recompute=0.2).token_ids == expected


def test_a_rule_of_your_own_skips_the_response_cache(tmp_path):
    engine = deep_engine("llama", response_cache_dir=tmp_path)
    text = prompt(STALE["union"])
    policy = Recompute(0.2, rule=lambda cands, budget: range(budget))
    assert engine.generate(text, max_new_tokens=4, recompute=policy).usage.recomputed_tokens > 0
    again = engine.generate(text, max_new_tokens=4, recompute=policy)
    assert not again.usage.response_cached and again.usage.recomputed_tokens > 0
