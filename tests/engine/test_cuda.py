"""On a CUDA device: module states resident on the GPU or pinned in host memory, same outputs as the
uncached prefill, and the CPU fallback still forced by device="cpu". Skipped where torch sees no GPU."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import promptcache as pc

from .conftest import ALL_DOCS_PROMPT, DOCS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROMPTS = [ALL_DOCS_PROMPT, '<prompt schema="docs"><notes/>Which document?</prompt>',
           "Tell me about the hotel by the water.", [{"role": "user", "content": "Plan a trip to the city."}]]


def cuda_engine(arch: str, **kw) -> pc.Engine:
    model, tok = pc.testing.tiny_model(arch, seed=0)  # its own copy: .to("cuda") moves a model in place
    return pc.Engine(model, tok, device="cuda", progress=False, **kw)


def outputs(engine, **kw):
    engine.add_schema(DOCS)
    return [engine.generate(p, max_new_tokens=8, **kw).token_ids for p in PROMPTS]


def test_gpu_resident_modules_are_exact(arch):
    engine = cuda_engine(arch)
    assert engine.device.type == "cuda" and engine.pool.max_blocks == 0
    engine.add_schema(DOCS)
    for key in engine.store.keys():
        assert engine.store.tier_of(key) == "device" and engine.store.get(key).device.type == "cuda"
    cached = engine.generate(ALL_DOCS_PROMPT, max_new_tokens=12)
    plain = engine.generate(ALL_DOCS_PROMPT, max_new_tokens=12, enable_cache=False)
    assert cached.token_ids == plain.token_ids and cached.usage.cached_tokens > 0


def test_pinned_host_tier_gives_the_device_tier_outputs(arch):
    expected = outputs(cuda_engine(arch))
    hosted = cuda_engine(arch, device_budget_bytes=0)
    assert outputs(hosted) == expected
    assert hosted.store.stats()["device_modules"] == 0
    for key in hosted.store.keys():
        states = hosted.store.get(key)
        assert states.device.type == "cpu" and all(k.is_pinned() for k in states.keys)


def test_threads_on_the_gpu_match_serial(arch):
    engine = cuda_engine(arch)
    serial = outputs(engine)
    with ThreadPoolExecutor(max_workers=4) as workers:
        got = list(workers.map(lambda p: engine.generate(p, max_new_tokens=8).token_ids, PROMPTS * 3))
    assert got == serial * 3


def test_from_pretrained_picks_the_gpu(tmp_path):
    path = pc.testing.save_tiny(tmp_path / "llama", "llama", seed=0)
    engine = pc.Engine.from_pretrained(str(path), progress=False)
    assert engine.device.type == "cuda"
    forced = pc.Engine.from_pretrained(str(path), device="cpu", progress=False)
    assert forced.device.type == "cpu"
    for e in (engine, forced):
        e.add_schema(DOCS)
        cached = e.generate(ALL_DOCS_PROMPT, max_new_tokens=8)
        assert cached.token_ids == e.generate(ALL_DOCS_PROMPT, max_new_tokens=8, enable_cache=False).token_ids
