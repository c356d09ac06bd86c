"""The server's engine options reach the engine."""

from __future__ import annotations

import argparse

import pytest

from promptcache.errors import PromptCacheError
from promptcache.server.main import add_arguments, engine_kwargs


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def test_int8_decode_is_off_unless_asked_for():
    assert engine_kwargs(parse())["int8_decode"] is False
    assert engine_kwargs(parse("--int8-decode"))["int8_decode"] is True


def test_compile_decode_is_off_unless_asked_for():
    assert engine_kwargs(parse())["compile_decode"] is False
    assert engine_kwargs(parse("--compile-decode"))["compile_decode"] is True


def test_the_prefix_budget_is_the_engines_default_unless_given():
    assert "prefix_budget_bytes" not in engine_kwargs(parse())
    assert engine_kwargs(parse("--prefix-budget-bytes", "1024"))["prefix_budget_bytes"] == 1024


def test_recompute_is_the_engines_default_unless_given_and_must_be_a_fraction():
    assert "recompute" not in engine_kwargs(parse())
    assert engine_kwargs(parse("--recompute", "0.2"))["recompute"] == 0.2
    for bad in ("1.5", "-0.1", "nan"):
        with pytest.raises(PromptCacheError, match=r"--recompute must be a fraction in \[0, 1\]"):
            engine_kwargs(parse("--recompute", bad))


def test_the_server_bounds_the_module_budget_unless_told_otherwise():
    from promptcache.engine.budget import SERVER_MODULE_BUDGET_BYTES

    assert engine_kwargs(parse())["module_budget_bytes"] == SERVER_MODULE_BUDGET_BYTES > 0
    assert engine_kwargs(parse("--module-budget-bytes", "1024"))["module_budget_bytes"] == 1024
    assert engine_kwargs(parse("--module-budget-bytes", "none"))["module_budget_bytes"] is None
    for bad in ("-1", "1GB"):
        with pytest.raises(SystemExit):
            parse("--module-budget-bytes", bad)


def test_response_reuse_flags():
    assert engine_kwargs(parse())["response_match"] == "exact"
    kw = engine_kwargs(parse("--response-cache-dir", "/tmp/r", "--response-match", "semantic"))
    assert (kw["response_cache_dir"], kw["response_match"]) == ("/tmp/r", "semantic")
    with pytest.raises(SystemExit):
        parse("--response-match", "fuzzy")
