"""Decoding: stop conditions, lengths, seeded sampling, penalties, streaming and usage."""

from __future__ import annotations

import warnings

import pytest
import torch

import promptcache as pc

from .conftest import ALL_DOCS_PROMPT, DOCS, make_engine

SAMPLING = {"temperature": 0.8, "top_k": 50, "top_p": 0.9}


@pytest.fixture
def docs(engine):
    engine.add_schema(DOCS)
    return engine


def test_stop_string_ends_generation_before_it(docs):
    full = docs.generate(ALL_DOCS_PROMPT, max_new_tokens=14, ignore_eos=True)
    text = full.text
    # A stop string from the middle of the unconstrained output.
    at = next(i for i in range(3, len(text) - 3) if text[i:i + 3].strip() == text[i:i + 3])
    stop = text[at:at + 3]
    out = docs.generate(ALL_DOCS_PROMPT, max_new_tokens=14, ignore_eos=True, stop=[stop, "never-seen"])
    assert out.finish_reason == "stop"
    assert out.text == text[: text.find(stop)] and stop not in out.text
    assert full.token_ids[: len(out.token_ids)] == out.token_ids
    assert (out.stop_sequence, full.stop_sequence) == (stop, None)  # which one ended it (the server reports it)
    last = list(docs.stream(ALL_DOCS_PROMPT, max_new_tokens=14, ignore_eos=True, stop=[stop, "never-seen"]))[-1]
    assert (last.finish_reason, last.stop_sequence) == ("stop", stop)


def test_stop_token_ids(docs):
    full = docs.generate(ALL_DOCS_PROMPT, max_new_tokens=12, ignore_eos=True)
    token = full.token_ids[4]
    out = docs.generate(ALL_DOCS_PROMPT, max_new_tokens=12, ignore_eos=True, stop_token_ids=[token])
    first = full.token_ids.index(token)
    assert out.finish_reason == "stop"
    assert out.token_ids == full.token_ids[:first] and out.usage.output_tokens == first


def test_max_new_tokens_finishes_with_length(docs):
    out = docs.generate(ALL_DOCS_PROMPT, max_new_tokens=5, ignore_eos=True)
    assert out.finish_reason == "length"
    assert out.usage.output_tokens == len(out.token_ids) == 5


def test_seeded_sampling_is_reproducible_and_cache_independent(docs):
    a = docs.generate(ALL_DOCS_PROMPT, max_new_tokens=12, seed=11, ignore_eos=True, **SAMPLING)
    b = docs.generate(ALL_DOCS_PROMPT, max_new_tokens=12, seed=11, ignore_eos=True, **SAMPLING)
    plain = docs.generate(ALL_DOCS_PROMPT, max_new_tokens=12, seed=11, ignore_eos=True, enable_cache=False,
                          **SAMPLING)
    assert a.token_ids == b.token_ids == plain.token_ids
    others = {docs.generate(ALL_DOCS_PROMPT, max_new_tokens=12, seed=s, ignore_eos=True, **SAMPLING).token_ids
              for s in (1, 2, 3)}
    assert len(others | {a.token_ids}) > 1, "different seeds should sample differently"


def test_repetition_penalty_changes_the_output(docs):
    plain = docs.generate(ALL_DOCS_PROMPT, max_new_tokens=16, ignore_eos=True)
    penalised = docs.generate(ALL_DOCS_PROMPT, max_new_tokens=16, ignore_eos=True, repetition_penalty=3.0)
    assert penalised.token_ids != plain.token_ids
    cached_equals_plain = docs.generate(ALL_DOCS_PROMPT, max_new_tokens=16, ignore_eos=True,
                                        repetition_penalty=3.0, enable_cache=False)
    assert cached_equals_plain.token_ids == penalised.token_ids


@pytest.mark.parametrize("kwargs", [{}, {"stop": ["e"]}, {"seed": 5, **SAMPLING}])
def test_stream_concatenates_to_generate(docs, kwargs):
    out = docs.generate(ALL_DOCS_PROMPT, max_new_tokens=10, **kwargs)
    chunks = list(docs.stream(ALL_DOCS_PROMPT, max_new_tokens=10, **kwargs))
    assert "".join(c.text for c in chunks) == out.text
    assert all(c.usage is None and c.finish_reason is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.usage is not None and last.finish_reason == out.finish_reason
    assert last.usage.output_tokens == out.usage.output_tokens
    assert last.usage.input_tokens == out.usage.input_tokens


def test_usage_is_consistent(docs):
    plan = docs.plan(ALL_DOCS_PROMPT).tokens
    cached = docs.generate(ALL_DOCS_PROMPT, max_new_tokens=6)
    plain = docs.generate(ALL_DOCS_PROMPT, max_new_tokens=6, enable_cache=False)
    for out in (cached, plain):
        u = out.usage
        assert u.input_tokens == len(plan.token_ids)
        assert 0 <= u.ttft_s <= u.total_s
        assert u.output_tokens == len(out.token_ids)
    u = cached.usage
    assert u.cached_tokens == plan.cached_token_count
    assert u.input_tokens == u.cached_tokens + len(plan.new_token_ids)
    assert u.modules_hit == plan.cached and u.modules_written == () and u.cache_write_tokens == 0
    assert plain.usage.cached_tokens == 0 and plain.usage.modules_hit == ()


def test_prompt_without_new_tokens_computes_its_last_token(docs):
    # Nothing after the schema: the last cached token is recomputed to get the first logits.
    prompt = '<prompt schema="docs"><intro/><code/><notes/></prompt>'
    plan = docs.plan(prompt).tokens
    assert plan.new_token_ids == ()
    cached = docs.generate(prompt, max_new_tokens=8)
    plain = docs.generate(prompt, max_new_tokens=8, enable_cache=False)
    assert cached.token_ids == plain.token_ids
    assert cached.usage.cached_tokens == plan.cached_token_count - 1


def test_prompt_ending_in_root_text_without_new_tokens(arch):
    engine = make_engine(arch)
    engine.add_schema('<schema name="t">Read this.<module name="a">The city has a hotel.</module>'
                      " Answer:</schema>")
    prompt = '<prompt schema="t"><a/></prompt>'
    cached = engine.generate(prompt, max_new_tokens=6)
    assert cached.token_ids == engine.generate(prompt, max_new_tokens=6, enable_cache=False).token_ids


def test_unseeded_sampling_leaves_the_global_rng_alone(docs):
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    docs.generate(ALL_DOCS_PROMPT, max_new_tokens=3, **SAMPLING)
    assert torch.equal(torch.rand(4), expected)


# ---- streamed text: never emit what a later token could change ---------------------------------

STREAM_CASES = [
    ["▁about", "<0x74>", "<0xF0>", "▁the"],    # "t" from a byte token merges into an invalid byte run
    ["▁a", "<0xE2>", "<0x82>", "<0xAC>", "▁b"],  # a 3-byte character (the euro sign) arriving bytewise
    ["▁the", "▁city", "<0xF0>"],               # ends on an unfinished character
]


@pytest.mark.parametrize("pieces", STREAM_CASES, ids=["merged-byte", "utf8-bytes", "unfinished"])
@pytest.mark.parametrize("stop", [(), ("ty",)])
def test_streamed_deltas_are_stable_prefixes(pieces, stop):
    from promptcache.engine.generate import TextTracker

    tok = pc.testing.tiny_tokenizer()
    ids = tok.convert_tokens_to_ids(pieces)
    assert tok.unk_token_id not in ids, "every piece is in the tiny vocabulary"
    tracker, streamed = TextTracker(tok, stop), ""
    for i in ids:
        tracker.add(i)
        streamed += tracker.delta(final=False)
        assert tok.decode(ids, skip_special_tokens=True).startswith(streamed) or tracker.stopped
        if tracker.stopped:
            break
    streamed += tracker.delta(final=True)
    assert streamed == tracker.text


@pytest.mark.parametrize("params, expected", [
    ({}, True),
    ({"temperature": 0.7}, False),
    ({"temperature": 0.7, "seed": 1234}, True),
    ({"temperature": 1.0, "top_k": 1}, True),
    ({"temperature": 0.0, "top_p": 0.5}, True),
])
def test_deterministic_sampling_params(params, expected):
    assert pc.SamplingParams(**params).deterministic is expected


def test_no_deprecated_model_argument_is_passed(arch):
    """transformers 5.25 renamed the model's `past_key_values` argument `cache` (the old name warns on every call and
    goes in 5.40): a cached request with a module, new text and decoding passes whichever name the model takes."""
    engine = make_engine(arch)
    engine.add_schema(DOCS)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*")
        engine.generate(ALL_DOCS_PROMPT, max_new_tokens=3, ignore_eos=True)
        engine.generate("A plain prompt.", max_new_tokens=3, ignore_eos=True)
