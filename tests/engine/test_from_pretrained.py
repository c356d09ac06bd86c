"""Engine.from_pretrained: a saved checkpoint, the built-in names, device and dtype choice, user errors.

Every kind of name is covered in tests/models/test_load.py; here the engine built on each one.
"""

from __future__ import annotations

import pytest
import torch

import promptcache as pc
from promptcache.errors import PromptError

from .conftest import ALL_DOCS_PROMPT, DOCS


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return pc.testing.save_tiny(tmp_path_factory.mktemp("ckpt") / "llama", "llama", seed=0)


def test_loads_on_the_cpu_without_a_gpu_and_is_exact(checkpoint):
    engine = pc.Engine.from_pretrained(str(checkpoint), progress=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert engine.device.type == expected and engine.adapter.dtype == torch.float32
    engine.add_schema(DOCS)
    cached = engine.generate(ALL_DOCS_PROMPT, max_new_tokens=8)
    assert cached.usage.cached_tokens > 0
    assert cached.token_ids == engine.generate(ALL_DOCS_PROMPT, max_new_tokens=8, enable_cache=False).token_ids
    model, _ = pc.testing.tiny_model("llama", seed=0)  # the same weights, built in memory
    direct = pc.Engine(model, engine.tokenizer, device=engine.device, progress=False)
    direct.add_schema(DOCS)
    assert direct.generate(ALL_DOCS_PROMPT, max_new_tokens=8).token_ids == cached.token_ids


def test_device_and_dtype_are_honoured(checkpoint):
    engine = pc.Engine.from_pretrained(checkpoint, device="cpu", dtype="bfloat16", progress=False,
                                       prefix_cache=False)
    assert engine.device.type == "cpu" and engine.adapter.dtype == torch.bfloat16 and engine.prefix is None
    engine.add_schema(DOCS)
    assert next(iter(engine.module_states("docs", "intro").keys)).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", ["float33", "nn", "Tensor"])
def test_unknown_dtype_is_a_prompt_error(checkpoint, dtype):
    with pytest.raises(PromptError, match=f"unknown dtype '{dtype}'; valid: auto, float32"):
        pc.Engine.from_pretrained(checkpoint, device="cpu", dtype=dtype)


def test_missing_checkpoint_is_a_prompt_error(tmp_path):
    with pytest.raises(PromptError, match="cannot load model .*nowhere"):
        pc.Engine.from_pretrained(tmp_path / "nowhere", device="cpu")


def test_the_builtin_real_model_is_exact_on_a_select_all_prompt(smollm2):
    engine = pc.Engine.from_pretrained("smollm2-135m-instruct", device="cpu", progress=False)
    assert engine.adapter.num_layers == 30 and engine.tokenizer.eos_token == "<|im_end|>"
    engine.add_schema(DOCS)
    cached = engine.generate(ALL_DOCS_PROMPT, max_new_tokens=8)
    assert cached.usage.cached_tokens > 0
    assert cached.token_ids == engine.generate(ALL_DOCS_PROMPT, max_new_tokens=8, enable_cache=False).token_ids


def test_tiny_is_the_random_model_of_promptcache_testing():
    engine = pc.Engine.from_pretrained("tiny", device="cpu", progress=False)
    model, _ = pc.testing.tiny_model("llama", seed=0)
    name = "model.embed_tokens.weight"
    assert torch.equal(engine.model.state_dict()[name], model.state_dict()[name])


@pytest.mark.parametrize("device", ["tpu", "gpu0"])
def test_unknown_device_is_a_prompt_error(checkpoint, device):
    with pytest.raises(PromptError, match=f"unknown device '{device}'; valid: auto, cpu, cuda"):
        pc.Engine.from_pretrained(checkpoint, device=device)
