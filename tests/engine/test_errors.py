"""User mistakes raise PromptError/SchemaError naming the culprit, and the engine keeps serving."""

from __future__ import annotations

import pytest

import promptcache as pc
from promptcache.errors import PromptError, SchemaError

from .conftest import ALL_DOCS_PROMPT, DOCS, make_engine

SHORT = """
<schema name="short">
  Be brief.
  <module name="doc">The city has a hotel.</module>
</schema>
"""


@pytest.fixture
def served(engine):
    engine.add_schema(DOCS)
    return engine, engine.generate(ALL_DOCS_PROMPT, max_new_tokens=8)


def still_serves(engine, expected):
    assert engine.generate(ALL_DOCS_PROMPT, max_new_tokens=8).token_ids == expected.token_ids


def test_unknown_schema_lists_the_added_ones(served):
    engine, expected = served
    with pytest.raises(PromptError) as info:
        engine.generate('<prompt schema="nope"><intro/>Hi</prompt>')
    assert "'nope'" in str(info.value) and "docs" in str(info.value)
    still_serves(engine, expected)


@pytest.mark.parametrize("kwargs, name", [
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"top_k": -1}, "top_k"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"stop": [""]}, "stop"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
])
def test_invalid_sampling_values_name_the_argument(served, kwargs, name):
    engine, expected = served
    with pytest.raises(PromptError, match=name):
        engine.generate(ALL_DOCS_PROMPT, **kwargs)
    with pytest.raises(PromptError, match=name):
        list(engine.stream(ALL_DOCS_PROMPT, **kwargs))
    still_serves(engine, expected)


@pytest.mark.parametrize("prompt, error", [
    ('<prompt schema="docs"><intro></prompt>', SchemaError),
    ('<prompt schema="docs"><intro/>a < b</prompt>', SchemaError),
    ('<prompt schema="docs"><intro/><intro/>Hi</prompt>', PromptError),
    ('<prompt schema="docs"><outro/>Hi</prompt>', PromptError),
    ('<prompt schema="docs"><intro days="3"/>Hi</prompt>', PromptError),
])
def test_bad_prompts_raise_and_leave_the_engine_working(served, prompt, error):
    engine, expected = served
    with pytest.raises(error):
        engine.generate(prompt)
    still_serves(engine, expected)


def test_malformed_schema_is_a_schema_error_with_a_line(served):
    engine, expected = served
    with pytest.raises(SchemaError) as info:
        engine.add_schema('<schema name="bad">\n<module name="x">text</schema>')
    assert info.value.line is not None
    assert set(engine.schemas) == {"docs"}
    still_serves(engine, expected)


@pytest.fixture
def small(arch):
    model, tok = pc.testing.tiny_model(arch, max_positions=64)
    return pc.Engine(model, tok, progress=False)


def test_schema_longer_than_the_context_window(small):
    long = SHORT.replace("The city has a hotel.", "The city has a hotel by the water. " * 12)
    with pytest.raises(PromptError) as info:
        small.add_schema(long)
    assert "'short'" in str(info.value) and "64" in str(info.value)
    assert "short" not in small.schemas


def test_prompt_longer_than_the_context_window(small):
    small.add_schema(SHORT)
    fits = '<prompt schema="short"><doc/>Where?</prompt>'
    ok = small.generate(fits, max_new_tokens=4)
    question = "Where is the hotel by the water? " * 10
    with pytest.raises(PromptError) as info:
        small.generate(f'<prompt schema="short"><doc/>{question}</prompt>')
    assert "64" in str(info.value)
    with pytest.raises(PromptError):
        small.generate(f'<prompt schema="short"><doc/>{question}</prompt>', enable_cache=False)
    assert small.generate(fits, max_new_tokens=4).token_ids == ok.token_ids


def test_generation_stops_at_the_end_of_the_context_window(small):
    small.add_schema(SHORT)
    prompt = '<prompt schema="short"><doc/>Where is the hotel by the water, and the city?</prompt>'
    plan = small.plan(prompt).tokens
    room = 64 - plan.next_position
    assert 0 < room < 40
    out = small.generate(prompt, max_new_tokens=40, ignore_eos=True)
    assert out.finish_reason == "length" and out.usage.output_tokens == room


@pytest.mark.parametrize("bad", [
    pc.Schema("s", (pc.Module("a", (pc.Text("one"),)), pc.Module("a", (pc.Text("two"),)))),  # same name twice
    pc.Schema("s", (pc.Module("a/b", (pc.Text("one"),)),)),  # not a name
    pc.Schema("s", (pc.Module("a", (pc.Param("n", -3),)),)),  # negative length
])
def test_schema_objects_get_the_rules_pml_text_gets(engine, bad):
    with pytest.raises(pc.PromptCacheError):
        engine.add_schema(bad)
    assert "s" not in engine.schemas


def test_prompt_objects_get_the_rules_pml_text_gets(engine):
    engine.add_schema(DOCS)
    twice = pc.Prompt("docs", (pc.Selection("intro"), pc.Selection("intro")))
    with pytest.raises(pc.PromptCacheError, match="intro"):
        engine.generate(twice, max_new_tokens=1)


@pytest.mark.parametrize("kwargs, culprit", [
    ({"temperature": "0.5"}, "temperature"), ({"temperature": None}, "temperature"),
    ({"temperature": float("inf")}, "temperature"), ({"stop": 123}, "stop"), ({"stop": {"a": 1}}, "stop"),
    ({"stop_token_ids": 5}, "stop_token_ids"), ({"top_k": True}, "top_k"), ({"seed": 2**70}, "seed"),
    ({"seed": "abc"}, "seed"), ({"seed": 1.5}, "seed"), ({"ignore_eos": "no"}, "ignore_eos"),
    ({"max_new_tokens": True}, "max_new_tokens"), ({"enable_cache": "no"}, "enable_cache"),
    ({"namespace": 3}, "namespace"), ({"top_p": 0}, "top_p"), ({"bogus": 1}, "bogus"),
])
def test_bad_request_arguments_are_named(engine, kwargs, culprit):
    # Each is refused before any model work, also under greedy decoding (seed="abc" used to be accepted).
    with pytest.raises(PromptError, match=culprit):
        engine.generate("Hello there", **{"max_new_tokens": 2, **kwargs})


@pytest.mark.parametrize("prompt, culprit", [
    ("", "empty"), ("a \ud800 b", "surrogate"), ([{"role": "user", "content": "x\udfff"}], "surrogate"),
])
def test_bad_prompt_text_is_refused(engine, prompt, culprit):
    with pytest.raises(PromptError, match=culprit):
        engine.generate(prompt, max_new_tokens=2)


def test_numpy_scalars_are_numbers(arch, tmp_path):
    np = pytest.importorskip("numpy")
    engine = make_engine(arch, response_cache_dir=tmp_path, ttl_s=np.float64(60), prefix_budget_bytes=np.int64(10**7))
    first = engine.generate("Hello there", max_new_tokens=np.int64(3), temperature=np.float32(0.0))
    again = engine.generate("Hello there", max_new_tokens=3)
    assert again.usage.response_cached and again.token_ids == first.token_ids


def test_huge_max_new_tokens_is_capped_by_the_context_window(small):
    out = small.generate("Hello there", max_new_tokens=10**12, ignore_eos=True)
    assert out.finish_reason == "length" and out.usage.input_tokens + out.usage.output_tokens == 64


@pytest.mark.parametrize("kwargs, culprit", [
    ({"ttl_s": "x"}, "ttl_s"), ({"ttl_s": float("nan")}, "ttl_s"), ({"prefix_budget_bytes": "x"}, "prefix_budget"),
    ({"prefix_budget_bytes": 1.5}, "prefix_budget"), ({"store_dir": ""}, "store_dir"),
    ({"store_dir": "a\0b"}, "store_dir"), ({"response_cache_dir": ""}, "response_cache_dir"),
    ({"pool_blocks": -1}, "pool_blocks"), ({"prefix_cache": "no"}, "prefix_cache"),
    ({"param_filler": ""}, "param_filler"), ({"pad_arguments": "no"}, "pad_arguments"),
])
def test_bad_engine_options_are_named(kwargs, culprit):
    with pytest.raises(PromptError, match=culprit):
        make_engine("llama", **kwargs)


def test_text_that_cannot_fit_is_refused_before_tokenizing(small, monkeypatch):
    from promptcache.engine import modules

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized a schema that could never fit")

    monkeypatch.setattr(modules, "compile_schema", no_tokenizing)
    text = "x" * (256 * 64 + 1)  # the small engine's window is 64 positions
    with pytest.raises(PromptError, match="context window of 64"):
        small.add_schema(f'<schema name="big"><module name="m">{text}</module></schema>')


def test_param_filler_and_padding_are_engine_options():
    schema = '<schema name="s"><module name="a">Trip <parameter name="d" length="5"/> days</module></schema>'
    prompt = '<prompt schema="s"><a d="3"/>Why?</prompt>'
    padded, gapped = make_engine("llama"), make_engine("llama", pad_arguments=False, param_filler="x")
    for e in (padded, gapped):
        e.add_schema(schema)
    a, b = padded.plan(prompt).tokens, gapped.plan(prompt).tokens
    assert a.positions == tuple(range(len(a.token_ids))) and a.next_position == b.next_position
    assert len(b.token_ids) < len(a.token_ids), "without padding the rest of the slot is a gap"
    filler = gapped.schema("s").modules["a"].slots["d"].filler
    assert set(filler) <= set(gapped.tokenizer.encode("x", add_special_tokens=False))
