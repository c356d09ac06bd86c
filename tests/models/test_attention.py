"""The engine's attention: SDPA, except one query (decoding), which is two grouped matmuls with the same result."""

from __future__ import annotations

import types

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import promptcache as pc
from promptcache.models.adapter import ATTENTION, adapter_for, one_query_attention

HEADS, KV_HEADS, DIM, KEYS = 8, 2, 16, 37


def _inputs(dtype: torch.dtype, queries: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, HEADS, queries, DIM, generator=g).to(dtype)
    k = torch.randn(2, KV_HEADS, KEYS, DIM, generator=g).to(dtype)
    v = torch.randn(2, KV_HEADS, KEYS, DIM, generator=g).to(dtype)
    return types.SimpleNamespace(num_key_value_groups=HEADS // KV_HEADS, is_causal=True, training=False), q, k, v


def _masks(queries: int = 1):
    allowed = torch.ones(1, 1, queries, KEYS, dtype=torch.bool)
    allowed[..., 5:9] = False
    allowed[..., -1] = True
    additive = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    per_head = allowed.expand(2, HEADS, queries, KEYS).clone()
    per_head[:, 3, :, 10:20] = False
    return {"none": None, "bool": allowed, "additive": additive, "per-head": per_head}


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("mask", ["none", "bool", "additive", "per-head"])
@pytest.mark.parametrize("scaling", [None, 0.3])
def test_one_query_equals_sdpa(dtype, atol, mask, scaling):
    module, q, k, v = _inputs(dtype)
    m = _masks()[mask]
    if m is not None and m.dtype != torch.bool:
        m = m.to(dtype)
    got, _ = one_query_attention(module, q, k, v, m, scaling=scaling)
    want, _ = sdpa_attention_forward(module, q, k, v, m, scaling=scaling)
    assert got.shape == want.shape == (2, 1, HEADS, DIM)
    assert torch.allclose(got.float(), want.float(), atol=atol)


def test_many_queries_go_to_sdpa():
    module, q, k, v = _inputs(torch.float32, queries=4)
    got, _ = one_query_attention(module, q, k, v, None)
    want, _ = sdpa_attention_forward(module, q, k, v, None)
    assert torch.equal(got, want)


@pytest.mark.parametrize("arch, expected", [("llama", ATTENTION), ("mistral", ATTENTION), ("qwen2", ATTENTION),
                                            ("falcon", "sdpa")])
def test_adapters_pick_it_where_the_model_dispatches_through_the_interface(arch, expected):
    model, _ = pc.testing.tiny_model(arch, seed=0)
    adapter_for(model)
    assert model.config._attn_implementation == expected
