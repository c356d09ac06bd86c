"""Models with sliding-window and global layers (Gemma 3): what assumes one attention kind per model.

Adapters mask each kind by position (tests/engine/test_sliding_window.py holds the engine-level
oracles); here: the recompute key mover rotates each layer by its own kind's frequencies, the
compiled decode step refuses windows by name, int8 decoding works, unknown kinds are refused.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch
from transformers.cache_utils import DynamicCache

import promptcache as pc
from promptcache.errors import PromptCacheError
from promptcache.models.adapter import attention_kinds, window_binds, window_masks
from promptcache.models.relocate import KeyMover, key_mover
from promptcache.testing import TINY_WINDOW, tiny_model

TEXT = "The city has a hotel by the water, and people talk about the long trip home. " * 3


def keys_at(model, ids: torch.Tensor, start: int) -> list[torch.Tensor]:
    """Every layer's keys [1, kv_heads, seq, head_dim] of a plain forward at positions start.. (all kept)."""
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    pos = torch.arange(start, start + ids.shape[1])[None]
    cache = DynamicCache()  # no config: every layer keeps every key
    with torch.inference_mode():
        model(input_ids=ids, position_ids=pos, use_cache=True, **{cache_arg: cache})
    return [layer.keys for layer in cache.layers]


def test_moved_keys_of_every_layer_kind_equal_keys_computed_there():
    # RoPE attention depends on distances only: the same tokens at positions shifted by d have the
    # same hidden states, so each layer's keys differ by exactly its kind's rotation by d.
    model, tok = tiny_model("gemma3", num_layers=4)
    kinds = model.config.layer_types
    assert set(kinds) == {"sliding_attention", "full_attention"}
    ids = tok(TEXT, return_tensors="pt").input_ids[:, :40]
    d = 300
    near, far = keys_at(model, ids, 0), keys_at(model, ids, d)
    mover = key_mover(model)
    delta = torch.full((ids.shape[1],), d, dtype=torch.long)
    for layer in range(len(kinds)):
        torch.testing.assert_close(mover.move(near[layer], delta, layer), far[layer], rtol=1e-4, atol=1e-4)
    # a global layer's keys turned by the local layers' frequencies are not the keys at p + d
    global_layer = kinds.index("full_attention")
    wrong = KeyMover(mover.rotary, ("sliding_attention",) * len(kinds)).move(near[global_layer], delta, global_layer)
    assert (wrong - far[global_layer]).abs().max() > 1e-2


def test_compile_decode_refuses_a_sliding_window_by_name():
    model, tok = tiny_model("gemma3")
    with pytest.raises(PromptCacheError, match=f"compile_decode does not support sliding-window attention "
                                               f"\\(gemma3_text: local layers see the last {TINY_WINDOW} positions"):
        pc.Engine(model, tok, progress=False, compile_decode=True)


def test_int8_decoding_runs_past_the_window_close_to_float_decoding():
    model, tok = tiny_model("gemma3")
    want = pc.Engine(model, tok, progress=False)
    model8, _ = tiny_model("gemma3")
    engine = pc.Engine(model8, tok, progress=False, int8_decode=True)
    n = len(engine.plan(TEXT).token_ids)
    assert n > 4 * TINY_WINDOW
    ref = want.generate(TEXT, max_new_tokens=12, ignore_eos=True)
    out = engine.generate(TEXT, max_new_tokens=12, ignore_eos=True)
    assert out.usage.output_tokens == 12 and engine.identity["decode"] == "int8"
    assert out.token_ids[0] == ref.token_ids[0]  # the prompt's logits: a many-token prefill, original weights


@pytest.mark.parametrize("kinds, window, expected", [
    ((), None, ((), None)),                                               # llama: one kind, no window
    ((), 16, ((), 16)),                                                   # mistral with a window: all local
    (("full_attention", "full_attention"), 16, (("full_attention",) * 2, None)),  # qwen2 without sliding
    (("sliding_attention", "full_attention"), 16, (("sliding_attention", "full_attention"), 16)),  # gemma3
])
def test_attention_kinds_read_the_config(kinds, window, expected):
    cfg = SimpleNamespace(model_type="x", layer_types=list(kinds) or None, sliding_window=window)
    assert attention_kinds(cfg) == expected


def test_a_layer_kind_the_adapter_cannot_mask_is_refused_by_name():
    cfg = SimpleNamespace(model_type="llama4_text", layer_types=["chunked_attention", "full_attention"],
                          sliding_window=None)
    with pytest.raises(PromptCacheError, match="'llama4_text' has chunked_attention layers, which promptcache "
                                               "does not support; supported layer kinds: full_attention, "
                                               "sliding_attention"):
        attention_kinds(cfg)


def test_a_local_layer_sees_the_last_window_positions_and_a_global_one_everything_before():
    k_pos = torch.tensor([0, 1, 2, 9, 10, 11, 12])  # a gap: positions 3..8 hold nothing
    masks = window_masks(torch.tensor([11, 12]), k_pos, 3, torch.float32, ("sliding_attention", "full_attention"))
    local, full = (masks[kind][0, 0] == 0 for kind in ("sliding_attention", "full_attention"))
    assert k_pos[local[1]].tolist() == [10, 11, 12] and k_pos[local[0]].tolist() == [9, 10, 11]
    assert k_pos[full[1]].tolist() == [0, 1, 2, 9, 10, 11, 12] and k_pos[full[0]].tolist() == [0, 1, 2, 9, 10, 11]
    assert window_binds(torch.tensor([3]), torch.arange(4), 3)  # key 0 is 3 positions back: out
    assert not window_binds(torch.tensor([2]), torch.arange(3), 3)
