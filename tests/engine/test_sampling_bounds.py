"""Sampling parameters that would overflow are refused by name; no combination raises a raw exception
(issue 27, finding 5: temperature 1e-300 and repetition_penalty 1e-308 passed validation, then
crashed sampling with a raw RuntimeError, a 500 over HTTP).
"""

from __future__ import annotations

import itertools

import pytest

import promptcache as pc
from promptcache.engine.generate import SCALE_RANGE
from promptcache.errors import PromptError

TEMPERATURES = [0, 1e-300, 1e-45, 1e-3, SCALE_RANGE[0], 1.0, SCALE_RANGE[1], 1e8, 1e300]
TOP_PS = [1e-300, 0.5, 1.0]
TOP_KS = [0, 1, 10**30]
PENALTIES = [1e-308, 1e-45, SCALE_RANGE[0], 1.0, SCALE_RANGE[1], 1e38, 1e308]
SEEDS = [None, 2**64 - 1]


def in_range(value: float) -> bool:
    return SCALE_RANGE[0] <= value <= SCALE_RANGE[1]


@pytest.fixture(scope="module")
def tiny_engine() -> pc.Engine:
    model, tok = pc.testing.tiny_model("llama")
    return pc.Engine(model, tok, progress=False)


@pytest.mark.parametrize("name, value", [("temperature", 1e-300), ("temperature", 1e-3), ("temperature", 1e3),
                                         ("repetition_penalty", 1e-308), ("repetition_penalty", 0.001),
                                         ("repetition_penalty", 1e308)])
def test_overflowing_values_are_refused_by_name(tiny_engine, name, value):
    with pytest.raises(PromptError, match=f"invalid {name}=.*from 0.01 to 100"):
        tiny_engine.generate("Hello", max_new_tokens=2, **{name: value})
    assert tiny_engine.generate("Hello", max_new_tokens=2, temperature=0.7, seed=1).token_ids  # still serving


def run_grid(engine, temperatures, top_ps, top_ks, penalties, seeds, n_tokens: int) -> int:
    """Every combination completes or is refused with a PromptError naming an out-of-range value;
    returns how many completed."""
    completed = 0
    for t, p, k, r, s in itertools.product(temperatures, top_ps, top_ks, penalties, seeds):
        kw = {"temperature": t, "top_p": p, "top_k": k, "repetition_penalty": r, "seed": s}
        out_of_range = [name for name, ok in (("temperature", t == 0 or in_range(t)),
                                              ("repetition_penalty", in_range(r))) if not ok]
        try:
            out = engine.generate("Hello there", max_new_tokens=n_tokens, enable_cache=False, **kw)
        except PromptError as e:
            assert any(f"invalid {name}=" in str(e) for name in out_of_range), f"{kw} refused: {e}"
            continue
        assert not out_of_range, f"{kw} accepted"
        assert len(out.token_ids) <= n_tokens
        completed += 1
    return completed


def test_no_combination_of_extreme_values_raises_a_raw_exception_tiny(tiny_engine):
    completed = run_grid(tiny_engine, TEMPERATURES, TOP_PS, TOP_KS, PENALTIES, SEEDS, n_tokens=3)
    assert completed == 4 * len(TOP_PS) * len(TOP_KS) * 3 * len(SEEDS)


def test_no_combination_of_extreme_values_raises_a_raw_exception_smollm2(smollm2):
    engine = pc.Engine(smollm2.model, smollm2.tokenizer, progress=False)
    run_grid(engine, [0, 1e-300, SCALE_RANGE[0], SCALE_RANGE[1], 1e300], [1e-300, 1.0], [0, 10**30],
             [1e-308, SCALE_RANGE[0], SCALE_RANGE[1], 1e308], [None, 2**64 - 1], n_tokens=2)
