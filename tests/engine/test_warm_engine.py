"""Warm request blocks in the engine: the same outputs as copying, never shared, never stale."""

from __future__ import annotations

import threading

import torch

from .conftest import DOCS, make_engine

DOC = " ".join(["The city has a hotel by the water, and people talk about the long trip."] * 5)
ASK = ["What is by the water?", "Who talks about the trip?", "What is the city known for?", "Where is it?"]
PML = '<prompt schema="docs"><intro/><code/><notes/>{}</prompt>'
SKIP = '<prompt schema="docs"><intro/><notes/>{}</prompt>'
REQUESTS = [
    DOC + ASK[0], DOC + ASK[1],                       # same document, new question: the prefix is kept
    PML.format(ASK[0]), PML.format(ASK[1]),           # same modules, new question: the runs are kept
    [{"role": "user", "content": DOC}], [{"role": "user", "content": DOC},
                                        {"role": "assistant", "content": "Yes."},
                                        {"role": "user", "content": ASK[2]}],
    SKIP.format(ASK[3]),                              # fewer modules: only the first run is kept
    DOC[:50] + ASK[3], DOC + ASK[0],                  # a shorter common start, then the first again
]


def _first_logits(engine, prompt, **kw):
    plan = engine.plan(prompt, **kw)
    with engine.prefill(plan) as pre:
        return pre.logits.clone()


def test_warm_blocks_give_the_outputs_of_copying(arch):
    warm, copying = make_engine(arch), make_engine(arch, pool_blocks=0)  # no pool: every splice copies
    for e in (warm, copying):
        e.add_schema(DOCS)
    for prompt in REQUESTS:
        a = warm.generate(prompt, max_new_tokens=6, ignore_eos=True)
        b = copying.generate(prompt, max_new_tokens=6, ignore_eos=True)
        assert a.token_ids == b.token_ids and a.usage.cached_tokens == b.usage.cached_tokens
        assert torch.allclose(_first_logits(warm, prompt), _first_logits(copying, prompt), atol=1e-5)
    assert warm.pool.warm_hits >= len(REQUESTS) and warm.pool.kept_tokens > len(REQUESTS) * 40
    assert copying.pool.warm_hits == 0


def test_a_warm_prefix_continues_past_what_the_prefix_tree_holds():
    engine = make_engine("llama", prefix_budget_bytes=0)  # the tree keeps nothing: only the block remembers
    first = engine.generate(DOC + ASK[0], max_new_tokens=4, ignore_eos=True)
    second = engine.generate(DOC + ASK[1], max_new_tokens=4, ignore_eos=True)
    assert first.usage.cached_tokens == 0 and second.usage.cached_tokens > 40
    assert second.token_ids == engine.generate(DOC + ASK[1], max_new_tokens=4, ignore_eos=True,
                                               enable_cache=False).token_ids


def test_a_namespace_never_continues_another_namespaces_block():
    engine = make_engine("llama")
    engine.generate(DOC + ASK[0], max_new_tokens=2, namespace="a")
    other = engine.generate(DOC + ASK[0], max_new_tokens=2, namespace="b")
    assert other.usage.cached_tokens == 0 and engine.pool.warm_hits == 0
    again = engine.generate(DOC + ASK[1], max_new_tokens=2, namespace="a")
    assert again.usage.cached_tokens > 40


def test_states_of_a_replaced_schema_are_never_kept():
    engine = make_engine("llama")
    old = DOCS.replace("You answer questions", "They answer questions")
    assert len(engine.tokenizer(old).input_ids) == len(engine.tokenizer(DOCS).input_ids)
    engine.add_schema(old)
    engine.generate(PML.format(ASK[0]), max_new_tokens=3)  # a warm block holding the old states
    engine.add_schema(DOCS)  # same module texts and positions, another context: new states
    fresh = make_engine("llama")
    fresh.add_schema(DOCS)
    got, want = _first_logits(engine, PML.format(ASK[0])), _first_logits(fresh, PML.format(ASK[0]))
    assert torch.allclose(got, want, atol=1e-5)


def test_threads_never_share_a_warm_block():
    engine = make_engine("llama")
    engine.add_schema(DOCS)
    prompts = [DOC + ASK[i % 4] if i % 2 else PML.format(ASK[i % 4]) for i in range(8)]
    expected = [engine.generate(p, max_new_tokens=4, ignore_eos=True).token_ids for p in prompts]
    in_use: set[int] = set()
    shared: list[int] = []
    lock = threading.Lock()
    take, give = engine.pool.take_warm, engine.pool.give

    def tracked_take(*args, **kw):
        block, kept = take(*args, **kw)
        with lock:
            if block.data_ptr() in in_use:
                shared.append(block.data_ptr())
            in_use.add(block.data_ptr())
        return block, kept

    def tracked_give(block, *args, **kw):
        with lock:
            in_use.discard(block.data_ptr())
        give(block, *args, **kw)

    engine.pool.take_warm, engine.pool.give = tracked_take, tracked_give
    results: dict[int, tuple[int, ...]] = {}

    def work(i: int):
        for _ in range(3):
            results[i] = engine.generate(prompts[i], max_new_tokens=4, ignore_eos=True).token_ids

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not shared
    assert [results[i] for i in range(len(prompts))] == expected
    assert engine.pool.warm_hits > 0
