"""Engine(int8_decode=True): one- and two-row calls read an int8 copy of each linear weight."""

from __future__ import annotations

import pytest
import torch

import promptcache as pc
from promptcache.errors import PromptCacheError
from promptcache.models.int8 import MAX_ROWS, Int8DecodeLinear, int8_decode, quantize_rows

PROMPT = "The city has a hotel by the water, and people talk about the long trip. " * 4


def test_quantized_rows_are_within_half_a_step_of_the_weight():
    w = torch.randn(37, 50) * torch.linspace(0.1, 3, 37)[:, None]
    q, scales = quantize_rows(w)
    assert q.dtype == torch.int8 and scales.shape == (37,)
    err = (q.float() * scales[:, None] - w).abs()
    assert (err <= scales[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_few_rows_use_the_int8_copy_and_more_rows_the_weight(dtype):
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(64, 48)).to(dtype)
    ref = torch.nn.Linear(64, 48).to(dtype)
    ref.load_state_dict(lin[0].state_dict())
    assert int8_decode(lin) == 1 and isinstance(lin[0], Int8DecodeLinear)
    dequant = lin[0].int8_weight.to(dtype) * lin[0].int8_scales[:, None]
    for rows in range(1, MAX_ROWS + 1):
        x = torch.randn(1, rows, 64).to(dtype)
        want = torch.nn.functional.linear(x, dequant, lin[0].bias)
        torch.testing.assert_close(lin(x), want, rtol=2e-2, atol=2e-2)
        assert not torch.equal(lin(x), ref(x))  # not the original weight
    x = torch.randn(2, 3, 64).to(dtype)
    assert torch.equal(lin(x), ref(x))  # more rows: exactly the original layer


def test_an_int8_engine_prefills_the_same_states_and_decodes_close_to_them():
    model, tok = pc.testing.tiny_model("llama", seed=0)
    plain = pc.Engine(model, tok, progress=False)
    with plain.prefill(plain.plan(PROMPT)) as pre:
        before = [layer.keys[:, :, :pre.length].clone() for layer in pre.cache.layers]
    reference = plain.generate(PROMPT, max_new_tokens=12, ignore_eos=True)
    model8, _ = pc.testing.tiny_model("llama", seed=0)
    engine = pc.Engine(model8, tok, progress=False, int8_decode=True)
    with engine.prefill(engine.plan(PROMPT)) as pre:  # a many-token prefill's states: the original weights
        assert all(torch.equal(layer.keys[:, :, :pre.length], k) for layer, k in zip(pre.cache.layers, before))
    out = engine.generate(PROMPT, max_new_tokens=12, ignore_eos=True)
    assert out.token_ids[0] == reference.token_ids[0]
    assert out.usage.output_tokens == 12
    assert engine.identity["decode"] == "int8" and plain.identity["decode"] == "weights"
    assert sum(isinstance(m, Int8DecodeLinear) for m in model8.modules()) > 0


def test_int8_decode_is_a_flag_and_needs_linear_layers():
    model, tok = pc.testing.tiny_model("llama", seed=0)
    with pytest.raises(pc.PromptError, match="int8_decode"):
        pc.Engine(model, tok, progress=False, int8_decode="yes")
    with pytest.raises(PromptCacheError, match="no nn.Linear"):
        int8_decode(torch.nn.Sequential(torch.nn.ReLU()))
    with pytest.raises(PromptCacheError, match="bfloat16, float16 or float32"):
        int8_decode(torch.nn.Sequential(torch.nn.Linear(4, 4).double()))
