"""Engine micro-benchmarks on a tiny model: encode, splice, TTFT (cached/uncached), one decode step.

    pytest benchmarks/ --benchmark-only

Numbers here track regressions in the engine's own overhead; benchmarks/ttft.py measures the
realistic shapes.
"""

from __future__ import annotations

import pytest

from benchmarks.common import filler_text
from benchmarks.ttft import splice_setup
from promptcache.engine.engine import Engine
from promptcache.engine.generate import SamplingParams
from promptcache.testing import tiny_model

CONTEXT = 512
SHAPE = {"hidden_size": 128, "num_layers": 2}
QUESTION = "Question: what does the document say about the city? Answer:"


@pytest.fixture(scope="module")
def setup():
    model, tok = tiny_model("llama", seed=0, **SHAPE)
    engine = Engine(model, tok, progress=False)
    schema = f'<schema name="bench"><module name="doc">{filler_text(tok, CONTEXT)}</module></schema>'
    engine.add_schema(schema)
    prompt = f'<prompt schema="bench"><doc/>{QUESTION}</prompt>'
    return engine, schema, prompt


def test_encode(benchmark, setup):
    engine, schema, _ = setup
    benchmark(engine.add_schema, schema)


def test_splice(benchmark, setup):
    engine, _, prompt = setup
    benchmark(splice_setup(engine, prompt))


@pytest.mark.parametrize("enable_cache", [True, False], ids=["cached", "uncached"])
def test_ttft(benchmark, setup, enable_cache):
    engine, _, prompt = setup
    c = benchmark(engine.generate, prompt, max_new_tokens=1, enable_cache=enable_cache, ignore_eos=True)
    assert c.usage.output_tokens == 1


def test_time_per_output_token(benchmark, setup):
    """One decode step (the engine's own step: one token, in-place cache write)."""
    engine, _, prompt = setup
    plan, params, state = engine.plan(prompt), SamplingParams(ignore_eos=True), {}
    with engine.prefill(plan, max_new_tokens=2) as pre:
        n = pre.length

        def reset():  # back to just after the prefill, then pick the first token (no forward)
            for layer in pre.cache.layers:
                layer.crop(n)
            state["decoder"] = engine.decoder(plan, pre, params)
            state["decoder"].step()

        def step():  # feed that token (one forward, in-place cache write) and pick the next
            state["decoder"].step()

        benchmark.pedantic(step, setup=reset, rounds=50, warmup_rounds=2)
