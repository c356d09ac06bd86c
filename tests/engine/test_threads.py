"""One engine, many threads: every request gets its serial result; stored states stay untouched."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from .conftest import DOCS, make_engine

REQUESTS = [
    ('<prompt schema="docs"><intro/><code/><notes/>What is the answer?</prompt>', {}),
    ('<prompt schema="docs"><notes/>Which document?</prompt>', {}),
    ('<prompt schema="docs"><intro/>Tell me about the city.</prompt>', {"temperature": 0.8, "seed": 1}),
    ('<prompt schema="docs"><code/><notes/>Explain the code.</prompt>', {"temperature": 1.0, "top_k": 50,
                                                                       "seed": 7}),
    ('<prompt schema="docs">Nothing selected.</prompt>', {"repetition_penalty": 1.3}),
    ('<prompt schema="docs"><intro/><notes/>Why?</prompt>', {"temperature": 0.7, "top_p": 0.9, "seed": 3}),
]


def ids(engine, job, n: int) -> tuple[int, ...]:
    prompt, kwargs = job
    return engine.generate(prompt, max_new_tokens=n, **kwargs).token_ids


def snapshot(engine) -> dict:
    return {key: tuple(t.clone() for t in (*st.keys, *st.values, st.positions))
            for key in engine.store.keys() for st in [engine.store.get(key)]}


def test_concurrent_requests_match_serial_ones(engine):
    engine.add_schema(DOCS)
    serial = [ids(engine, job, 8) for job in REQUESTS]
    before = snapshot(engine)
    jobs = REQUESTS * 3
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda job: ids(engine, job, 8), jobs))
    assert results == serial * 3
    after = snapshot(engine)
    assert after.keys() == before.keys()
    for key, tensors in before.items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, after[key], strict=True)), key


def test_concurrent_streams_match_serial_ones(engine):
    engine.add_schema(DOCS)
    prompt, kw = REQUESTS[3]

    def streamed(_) -> str:
        return "".join(c.text for c in engine.stream(prompt, max_new_tokens=8, **kw))

    serial = streamed(None)
    with ThreadPoolExecutor(max_workers=4) as pool:
        texts = list(pool.map(streamed, range(4)))
    assert texts == [serial] * 4


def test_concurrent_requests_while_modules_are_dropped_and_re_encoded(arch):
    reference, engine = make_engine(arch), make_engine(arch, device_budget_bytes=0, host_budget_bytes=1)
    for e in (reference, engine):
        e.add_schema(DOCS)
    serial = [ids(reference, job, 6) for job in REQUESTS]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda job: ids(engine, job, 6), REQUESTS * 2))
    assert results == serial * 2
