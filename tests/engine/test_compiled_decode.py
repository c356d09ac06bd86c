"""Engine(compile_decode=True): the compiled one-token step gives the tokens of eager decoding.

Most tests trace the step with torch.compile's "eager" backend (the graph capture, the model kwargs
that reach the attention, the read-only block, the copy of each token's states into it) in
seconds; one slow test generates code with inductor.
"""

from __future__ import annotations

import threading

import pytest

import promptcache as pc
from promptcache.errors import PromptCacheError

from .conftest import ALL_DOCS_PROMPT, DOCS, make_engine

DOC = " ".join(["The city has a hotel by the water, and people talk about the long trip."] * 6)
REQUESTS = [
    DOC + " What is by the water?",     # a long prompt first: a reused block then holds stale states
    "Tell me about the hotel.",         # a short one in a block with another request's states past its end
    ALL_DOCS_PROMPT,
    [{"role": "user", "content": "Plan a trip to the city."}],
]
TURNS = ["Plan a trip to the city.", "And the hotel?"]


def _engine(arch: str, compiled: bool, backend: str = "eager"):
    engine = make_engine(arch)
    if compiled:
        engine.adapter.compile_decode(backend=backend)
    engine.add_schema(DOCS)
    return engine


def _outputs(engine) -> list[tuple[int, ...]]:
    out = [engine.generate(p, max_new_tokens=10, ignore_eos=True).token_ids for p in REQUESTS]
    chat = engine.chat()
    out += [tuple(chat.send(t, max_new_tokens=6, ignore_eos=True).token_ids) for t in TURNS]  # reuses turn 1's reply
    return out


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_compiled_decode_gives_the_tokens_of_eager_decoding(arch):
    eager, compiled = _engine(arch, False), _engine(arch, True)
    assert _outputs(compiled) == _outputs(eager)
    assert compiled.pool.warm_hits > 0  # decoded states written into the block are reused later


def test_threads_share_one_compiled_step():
    engine, reference = _engine("llama", True), _engine("llama", False)
    prompts = [REQUESTS[i % 3] for i in range(6)]
    expected = [reference.generate(p, max_new_tokens=8, ignore_eos=True).token_ids for p in prompts]
    got: dict[int, tuple[int, ...]] = {}

    def work(i: int):
        got[i] = engine.generate(prompts[i], max_new_tokens=8, ignore_eos=True).token_ids

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(len(prompts))] == expected


def test_a_compiled_engine_leaves_the_hub_kernel_context_alone(monkeypatch):
    """kernels 0.19 routes hub kernels through one context variable that turns process-wide while any thread runs
    compiled code; an eager forward in another thread then corrupted it for the whole process (the test above
    failed one run in three). A compiled engine's model never sets it: prefill, the compiled steps and their
    compilation."""
    layer = pytest.importorskip("kernels._internals.layer.layer")
    variable = getattr(layer, "_ACTIVE_KERNEL_FUNCS", None)
    if variable is None:
        pytest.skip("this kernels has no shared hub-kernel context variable")
    engine = _engine("llama", True)
    calls: list = []
    real_set = variable.set
    monkeypatch.setattr(variable, "set", lambda value: calls.append(value) or real_set(value))
    for prompt in REQUESTS[:3]:
        engine.generate(prompt, max_new_tokens=4, ignore_eos=True)
    assert engine.adapter.compiled.compile_s is not None and engine.adapter.compiled.compile_few_s is not None
    assert calls == []
    pc.Engine(*pc.testing.tiny_model("llama", seed=0), progress=False).generate(REQUESTS[1], max_new_tokens=2)
    assert calls, "an eager engine goes through the wrapper: the patch above sees its calls"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_few_new_tokens_after_a_cached_context_run_compiled_as_eagerly(arch):
    """A question after a cached prefix, after a spliced module, and a short uncached prompt: 3..32 new
    tokens in position order, run by the compiled several-token step, give eager's tokens."""
    eager, compiled = _engine(arch, False), _engine(arch, True)
    prompts = [DOC + " What is by the water?", DOC + " Who talks about the trip, and why?",  # prefix: the tail
               ALL_DOCS_PROMPT, "Tell me about the hotel."]
    outs = [[e.generate(p, max_new_tokens=6, ignore_eos=True) for p in prompts] for e in (eager, compiled)]
    assert [o.token_ids for o in outs[1]] == [o.token_ids for o in outs[0]]
    assert outs[1][1].usage.cached_tokens > 0  # the second question ran after the first one's prefix
    assert compiled.adapter.compiled.compile_few_s is not None


def test_threads_share_the_compiled_several_token_step():
    """Concurrent questions after one cached document: each runs the several-token step on its own block."""
    engine, reference = _engine("qwen2", True), _engine("qwen2", False)
    asks = ["What is by the water?", "Who talks about the trip?", "Where is the hotel, and why?",
            "Is the city by the water?", "What do people talk about?", "How long is the trip?"]
    prompts = [f"{DOC} {q}" for q in asks]
    for e in (engine, reference):
        e.generate(DOC, max_new_tokens=1)  # the document's states, for every question to reuse
    expected = [reference.generate(p, max_new_tokens=12, ignore_eos=True).token_ids for p in prompts]
    got: dict[int, pc.Completion] = {}

    def work(i: int):
        got[i] = engine.generate(prompts[i], max_new_tokens=12, ignore_eos=True)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i].token_ids for i in range(len(prompts))] == expected
    assert all(got[i].usage.cached_tokens > 0 for i in got)
    assert engine.adapter.compiled.compile_few_s is not None


def test_warm_up_compiles_both_steps_and_is_a_no_op_without_them():
    engine = _engine("llama", True)
    engine.warm_up()
    assert engine.adapter.compiled.compile_few_s is not None and engine.adapter.compiled.compile_s is not None
    plain = _engine("llama", False)
    plain.warm_up()
    assert plain.pool.hits + plain.pool.misses == 0  # no request ran


@pytest.mark.parametrize("arch", ["falcon", "mpt"])
def test_models_outside_the_attention_interface_are_refused(arch):
    with pytest.raises(PromptCacheError, match="compile_decode needs a model whose attention"):
        make_engine(arch, compile_decode=True)


def test_compile_decode_is_a_flag():
    with pytest.raises(pc.PromptError, match="compile_decode"):
        make_engine("llama", compile_decode="yes")


@pytest.mark.slow
def test_inductor_compiled_decode_gives_the_tokens_of_eager_decoding():
    eager, compiled = _engine("llama", False), _engine("llama", True, backend="inductor")
    assert _outputs(compiled) == _outputs(eager)
    assert compiled.adapter.compiled.compile_s > 0


def test_compiled_decode_over_int8_weights_gives_the_tokens_of_eager_int8_decoding():
    model, tok = pc.testing.tiny_model("llama", seed=0)
    eager = pc.Engine(model, tok, progress=False, int8_decode=True)
    model2, _ = pc.testing.tiny_model("llama", seed=0)
    compiled = pc.Engine(model2, tok, progress=False, int8_decode=True)
    compiled.adapter.compile_decode(backend="eager")
    for engine in (eager, compiled):
        engine.add_schema(DOCS)
    assert _outputs(compiled) == _outputs(eager)
