"""Continuous batching (`engine.scheduler`): requests in one batch give what each gives alone, and the
logits of every decode step equal the full prefill's, on every architecture (float32).

The oracle is transformers' own forward of the prompt's tokens (in position order) followed by the
tokens generated so far, at contiguous positions: step i's logits must be its logits at the prompt's
last token + i. A decoded token fed at a wrong position, into the wrong row's cache or over another
row's keys changes them.
"""

from __future__ import annotations

import threading

import pytest
import torch

import promptcache as pc
from promptcache.engine.scheduler import Scheduler

from .conftest import ALL_DOCS_PROMPT, DOCS, make_engine

LONG = "the city hotel has a long flight plan for the trip and the budget of the days " * 12
CHAT = [{"role": "system", "content": "You plan trips."}, {"role": "user", "content": "Where is the hotel?"}]
PROMPTS = {  # mixed PML (spliced modules), plain (prefix reuse) and chat requests
    "pml": ALL_DOCS_PROMPT,
    "plain": "the water and the air of the earth",
    "chat": CHAT,
    "long": LONG,  # several prefill chunks at prefill_chunk=8, in flight while the others decode
}


def _oracle(engine: pc.Engine, prompt, generated: tuple[int, ...]) -> torch.Tensor:
    """Logits [len(generated), vocab] of a full prefill of the prompt and what was generated."""
    ids = list(engine.plan(prompt, enable_cache=False).token_ids)
    full = torch.tensor([ids + list(generated)])
    with torch.inference_mode():
        logits = engine.model(input_ids=full, use_cache=False).logits[0].float()
    return logits[len(ids) - 1: len(ids) - 1 + len(generated)]


def _run(scheduler: Scheduler, requests: dict, steps_before: dict[str, int]):
    """Submit each request after `steps_before[name]` steps; step until all ended; {name: Request}."""
    engine, submitted, step = scheduler.engine, {}, 0
    while len(submitted) < len(requests) or scheduler.step():
        for name, (prompt, params) in requests.items():
            if name not in submitted and steps_before.get(name, 0) <= step:
                submitted[name] = scheduler.submit(engine.plan(prompt), params, keep_logits=True)
        step += 1
        assert step < 2000, "the scheduler did not finish"
    return submitted


def _completion(request):
    items = list(request)
    assert isinstance(items[-1], pc.Completion)
    assert "".join(items[:-1]) == items[-1].text
    return items[-1]


def test_a_batch_matches_the_full_prefill_at_every_step(arch):
    engine = make_engine(arch)
    engine.add_schema(DOCS)
    scheduler = Scheduler(engine, prefill_chunk=8, background=False)
    greedy = pc.SamplingParams(max_new_tokens=16, ignore_eos=True)
    requests = {name: (prompt, greedy) for name, prompt in PROMPTS.items()}
    ran = _run(scheduler, requests, {"pml": 0, "plain": 0, "chat": 2, "long": 3})
    assert scheduler.widest >= 3, "the requests never shared a decode step"
    for name, request in ran.items():
        done = _completion(request)
        assert len(done.token_ids) == 16
        steps = torch.stack(request.logits)
        torch.testing.assert_close(steps, _oracle(engine, PROMPTS[name], done.token_ids), rtol=1e-4, atol=1e-4,
                                   msg=lambda m, n=name: f"{n}: {m}")
        alone = make_engine(arch)
        alone.add_schema(DOCS)
        assert alone.generate(PROMPTS[name], greedy).token_ids == done.token_ids, name


def test_requests_join_and_leave_mid_batch_on_the_real_model(smollm2):
    """SmolLM2 (float32): a request that ends early (budget) leaves while the others go on."""
    engine = pc.Engine(smollm2.model, smollm2.tokenizer, progress=False)
    scheduler = Scheduler(engine, prefill_chunk=16, background=False)
    budgets = {"plain": 24, "chat": 12, "long": 8}
    requests = {name: (PROMPTS[name], pc.SamplingParams(max_new_tokens=n, ignore_eos=True))
                for name, n in budgets.items()}
    ran = _run(scheduler, requests, {"plain": 0, "chat": 1, "long": 2})
    assert scheduler.widest >= 2
    for name, request in ran.items():
        done = _completion(request)
        assert len(done.token_ids) == budgets[name]
        torch.testing.assert_close(torch.stack(request.logits), _oracle(engine, PROMPTS[name], done.token_ids),
                                   rtol=1e-3, atol=1e-3)


def test_rows_with_their_own_sampling_stops_and_budgets_share_a_batch():
    engine = make_engine("llama")
    kinds = {
        "greedy": pc.SamplingParams(max_new_tokens=9, ignore_eos=True),
        "seeded": pc.SamplingParams(max_new_tokens=7, temperature=0.9, top_k=20, seed=5, ignore_eos=True),
        "penalty": pc.SamplingParams(max_new_tokens=8, repetition_penalty=1.3, top_p=0.9, temperature=0.7, seed=1,
                                     ignore_eos=True),
    }
    alone = {name: make_engine("llama").generate(PROMPTS["plain"], params) for name, params in kinds.items()}
    some_text = alone["greedy"].text[: max(2, len(alone["greedy"].text) // 2)][-2:]
    kinds["stop"] = pc.SamplingParams(max_new_tokens=9, stop=(some_text,), ignore_eos=True)
    alone["stop"] = make_engine("llama").generate(PROMPTS["plain"], kinds["stop"])
    scheduler = Scheduler(engine, background=False)
    ran = _run(scheduler, {name: (PROMPTS["plain"], params) for name, params in kinds.items()}, {})
    assert scheduler.widest == len(kinds)
    for name, request in ran.items():
        done = _completion(request)
        assert (done.token_ids, done.text, done.finish_reason) == \
            (alone[name].token_ids, alone[name].text, alone[name].finish_reason), name
    assert alone["stop"].finish_reason == "stop" and len(alone["stop"].token_ids) < 9


def test_a_long_prefill_runs_in_chunks_between_decode_steps():
    engine = make_engine("llama")
    scheduler = Scheduler(engine, prefill_chunk=8, background=False)
    short = scheduler.submit(engine.plan(PROMPTS["plain"]), pc.SamplingParams(max_new_tokens=40, ignore_eos=True))
    scheduler.step()  # its prefill and first token
    long = scheduler.submit(engine.plan(LONG, enable_cache=False), pc.SamplingParams(max_new_tokens=2))
    chunks = -(-len(engine.plan(LONG).token_ids) // 8)
    for _ in range(chunks - 1):
        before = len(short.decoder.token_ids)
        scheduler.step()
        assert long.decoder is None, "the long prompt was prefilled in one step"
        assert len(short.decoder.token_ids) == before + 1, "a decode step waited for the whole prefill"
    scheduler.step()
    assert long.decoder is not None and long.ttft is not None
    while scheduler.step():
        pass
    assert _completion(long).token_ids == make_engine("llama").generate(LONG, max_new_tokens=2).token_ids


@pytest.mark.parametrize("when", ["prefilling", "decoding", "waiting"])
def test_a_cancelled_request_leaves_at_the_next_step_and_frees_its_cache(when):
    engine = make_engine("llama")
    scheduler = Scheduler(engine, prefill_chunk=8, max_batch=2 if when != "waiting" else 1, background=False)
    keep = scheduler.submit(engine.plan(PROMPTS["plain"]), pc.SamplingParams(max_new_tokens=12, ignore_eos=True))
    scheduler.step()
    gone = scheduler.submit(engine.plan(LONG, enable_cache=False), pc.SamplingParams(max_new_tokens=30))
    scheduler.step()
    if when == "decoding":
        while gone.decoder is None:
            scheduler.step()
    assert (gone in scheduler.waiting) == (when == "waiting")
    assert (gone.decoder is None) == (when != "decoding")
    idle = engine.pool.hits + engine.pool.misses
    gone.cancel()
    scheduler.step()
    assert gone not in scheduler.running and gone not in scheduler.waiting and gone.ended
    if when == "decoding":
        assert engine.pool.idle_bytes > 0, "the cancelled request's block did not go back to the pool"
    while scheduler.step():
        pass
    assert _completion(keep).token_ids == make_engine("llama").generate(
        PROMPTS["plain"], max_new_tokens=12, ignore_eos=True).token_ids
    assert engine.pool.hits + engine.pool.misses >= idle


def test_admission_waits_for_memory_and_refuses_what_never_fits():
    engine = make_engine("llama")
    per_token = Scheduler(engine, background=False).bytes_per_token
    plan = engine.plan(PROMPTS["plain"])
    need = plan.capacity(10) * per_token
    scheduler = Scheduler(engine, kv_budget_bytes=need + need // 2, background=False)
    first = scheduler.submit(plan, pc.SamplingParams(max_new_tokens=10, ignore_eos=True))
    second = scheduler.submit(plan, pc.SamplingParams(max_new_tokens=10, ignore_eos=True))
    scheduler.step()
    assert first in scheduler.running and second in scheduler.waiting
    while scheduler.step():
        pass
    assert _completion(first).token_ids == _completion(second).token_ids
    with pytest.raises(pc.PromptError, match=r"kv_budget_bytes=.*lower max_new_tokens") as err:
        scheduler.submit(plan, pc.SamplingParams(max_new_tokens=100))
    assert str(plan.capacity(100)) in str(err.value)


def test_concurrent_generate_calls_share_decode_steps_and_match_serial():
    engine = make_engine("llama")
    prompts = [f"{w} the water and the air" for w in ("city", "hotel", "trip", "flight", "code", "plan")]
    serial = [make_engine("llama").generate(p, max_new_tokens=16, ignore_eos=True).token_ids for p in prompts]
    out: dict[int, tuple[int, ...]] = {}
    barrier = threading.Barrier(len(prompts))

    def run(i: int) -> None:
        barrier.wait()
        out[i] = engine.generate(prompts[i], max_new_tokens=16, ignore_eos=True).token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [out[i] for i in range(len(prompts))] == serial
    assert engine.scheduler.widest > 1, "concurrent requests never shared a decode step"


def test_a_request_cache_grows_with_the_tokens_generated_not_max_new_tokens():
    engine = make_engine("llama")
    plan = engine.plan(PROMPTS["plain"])
    with engine.prefill(plan, max_new_tokens=2**31) as pre:
        assert pre.budget == plan.room  # the budget is still the room left in the window
        assert pre.cache.capacity < len(plan.token_ids) + 512, pre.cache.capacity
    scheduler = Scheduler(engine, background=False)
    request = scheduler.submit(plan, pc.SamplingParams(max_new_tokens=300, ignore_eos=True), keep_logits=True)
    while scheduler.step():
        pass
    done = _completion(request)
    assert len(done.token_ids) == 300  # the cache grew past its first block, and stayed exact
    torch.testing.assert_close(torch.stack(request.logits), _oracle(engine, PROMPTS["plain"], done.token_ids),
                               rtol=1e-4, atol=1e-4)
