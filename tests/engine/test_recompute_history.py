"""A full recompute (`recompute=1.0`) gives the same answer whatever came before it, for models whose
keys move (gaps closed) and for those whose keys cannot move (gaps kept): issue 27, finding "recompute
depends on earlier requests"."""

from __future__ import annotations

import functools

import pytest
import torch

import promptcache as pc
from promptcache.models.relocate import key_mover

from .test_recompute import add, first_logits, prompt

FAMILIES = pc.testing.ARCHS + pc.testing.FIXED_POSITION_ARCHS
# the parameter case: stale states (another argument) and no gap, so its full recompute is kept...
EARLIER = prompt('<a/><b/><detailed/><trip days="nine"/><c/>')
# ...and a prefix of it up to this prompt's last module: only a trailing gap (where <c/> was) tells them apart
LATER = prompt('<a/><b/><detailed/><trip days="nine"/>')


@functools.cache
def tiny(arch: str):
    return pc.testing.tiny_model(arch, seed=0)


def fresh_engine(arch: str) -> pc.Engine:
    model, tok = tiny(arch)
    engine = pc.Engine(model, tok, progress=False)
    add(engine)
    return engine


def test_the_groups_are_what_the_docs_say():
    for arch in FAMILIES:
        movable = key_mover(tiny(arch)[0]) is not None
        assert movable == (arch in pc.testing.ARCHS), arch


@pytest.mark.parametrize("arch", FAMILIES)
def test_a_full_recompute_does_not_depend_on_earlier_requests(arch):
    fresh, recomputed = first_logits(fresh_engine(arch), LATER, 1.0)
    assert recomputed > 0
    engine = fresh_engine(arch)
    engine.generate(EARLIER, max_new_tokens=4, recompute=1.0)
    engine.generate(LATER, max_new_tokens=4, recompute=1.0)
    after, _ = first_logits(engine, LATER, 1.0)
    torch.testing.assert_close(after, fresh, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_a_prompt_without_gaps_still_reads_its_kept_full_recompute(arch):
    engine = fresh_engine(arch)
    first = engine.generate(EARLIER, max_new_tokens=4, recompute=1.0)
    again = engine.generate(EARLIER, max_new_tokens=4, recompute=1.0)
    assert first.usage.recomputed_tokens > 0 and again.usage.recomputed_tokens == 0
    assert again.token_ids == first.token_ids
