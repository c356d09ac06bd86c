"""The engine's attention: SDPA, except a few queries (decoding, a short question), which are two grouped matmuls
with the same result."""

from __future__ import annotations

import importlib
import types

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import promptcache as pc
from promptcache.models.adapter import ATTENTION, FEW_QUERIES, adapter_for, grouped_attention

HEADS, KV_HEADS, DIM, KEYS = 8, 2, 16, 37


def _inputs(dtype: torch.dtype, queries: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, HEADS, queries, DIM, generator=g).to(dtype)
    k = torch.randn(2, KV_HEADS, KEYS, DIM, generator=g).to(dtype)
    v = torch.randn(2, KV_HEADS, KEYS, DIM, generator=g).to(dtype)
    return types.SimpleNamespace(num_key_value_groups=HEADS // KV_HEADS, is_causal=True, training=False), q, k, v


def _masks(queries: int = 1):
    allowed = torch.ones(1, 1, queries, KEYS, dtype=torch.bool).tril(KEYS - queries)  # causal, after a past
    allowed[..., 5:9] = False
    additive = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    per_head = allowed.expand(2, HEADS, queries, KEYS).clone()
    per_head[:, 3, :, 10:20] = False
    return {"none": None, "bool": allowed, "additive": additive, "per-head": per_head}


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("queries, mask", [(1, "none"), (1, "bool"), (1, "additive"), (1, "per-head"),
                                           (5, "bool"), (5, "additive"), (5, "per-head"), (FEW_QUERIES, "bool")])
@pytest.mark.parametrize("scaling", [None, 0.3])
def test_few_queries_equal_sdpa(dtype, atol, queries, mask, scaling):
    module, q, k, v = _inputs(dtype, queries)
    m = _masks(queries)[mask]
    if m is not None and m.dtype != torch.bool:
        m = m.to(dtype)
    got, _ = grouped_attention(module, q, k, v, m, scaling=scaling)
    want, _ = sdpa_attention_forward(module, q, k, v, m, scaling=scaling)
    assert got.shape == want.shape == (2, queries, HEADS, DIM)
    assert torch.allclose(got.float(), want.float(), atol=atol)


@pytest.mark.parametrize("queries, mask", [(FEW_QUERIES + 1, "bool"), (4, "none")])
def test_many_queries_or_no_mask_go_to_sdpa(queries, mask):
    module, q, k, v = _inputs(torch.float32, queries)
    m = _masks(queries)[mask]
    got, _ = grouped_attention(module, q, k, v, m)
    want, _ = sdpa_attention_forward(module, q, k, v, m)
    assert torch.equal(got, want)


def _dispatches_through_the_interface(arch: str) -> bool:
    """Falcon's attention went through transformers' AttentionInterface from transformers 5.25 on; MPT's never has."""
    module = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
    return hasattr(module, "ALL_ATTENTION_FUNCTIONS")


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "falcon"])
def test_adapters_pick_it_where_the_model_dispatches_through_the_interface(arch):
    model, _ = pc.testing.tiny_model(arch, seed=0)
    adapter_for(model)
    expected = ATTENTION if _dispatches_through_the_interface(arch) else "sdpa"
    assert arch not in ("llama", "mistral", "qwen2") or expected == ATTENTION
    assert model.config._attn_implementation == expected


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_block_attention_sees_the_filled_slots_and_its_own_key(dtype, atol):
    from promptcache.models.compiled import block_attention

    module, q, k, v = _inputs(dtype)
    module.layer_idx = 1
    fed, capacity = 20, 48
    g = torch.Generator().manual_seed(3)
    block = (torch.randn(2, 3, 2, KV_HEADS, capacity, DIM, generator=g) * 1e4).to(dtype)  # stale slots: big values
    past_k, past_v = block[0, 1, :, :, :fed], block[1, 1, :, :, :fed]
    new_k, new_v = k[:, :, :1], v[:, :, :1]
    sink: list = []
    got = block_attention(module, q, new_k, new_v, None, block, torch.tensor(fed), sink)
    want, _ = sdpa_attention_forward(module, q, torch.cat([past_k, new_k], 2), torch.cat([past_v, new_v], 2), None)
    assert torch.allclose(got.float(), want.float(), atol=atol)
    assert len(sink) == 1 and sink[0][0] is new_k and sink[0][1] is new_v
