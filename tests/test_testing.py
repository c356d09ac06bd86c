"""The tiny offline models and tokenizer every engine test builds on."""

from __future__ import annotations

import time
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from promptcache.errors import PromptCacheError
from promptcache.testing import ARCHS, load_tiny, save_tiny, tiny_model, tiny_tokenizer

PROMPTS = (
    "The quick brown fox",
    "def f(x):\n    return",
    "Hello world. This is a test of",
    "You are a travel planner. Plan a trip lasting 3 days.",
    "<html>&amp; water",
    "first who may down side been now find any new work",
)


def greedy(model, ids: torch.Tensor, steps: int) -> list[int]:
    """Greedy decode with the model's own KV cache."""
    new: list[int] = []
    with torch.no_grad():
        out = model(ids, use_cache=True)
        for _ in range(steps):
            new.append(int(out.logits[0, -1].argmax()))
            out = model(torch.tensor([[new[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return new


@pytest.mark.parametrize("arch", ARCHS)
def test_each_arch_builds_and_runs_forward(arch: str) -> None:
    start = time.perf_counter()
    model, tok = tiny_model(arch)
    ids = tok("Plan a trip.", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    assert torch.isfinite(logits).all()
    assert not model.training
    assert model.config.vocab_size == len(tok)
    assert model.config.eos_token_id == tok.eos_token_id
    assert time.perf_counter() - start < 30  # generous: "seconds", not a benchmark


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_decodes_are_not_degenerate(arch: str) -> None:
    model, tok = tiny_model(arch)
    repeats = []
    for prompt in PROMPTS:
        new = greedy(model, tok(prompt, return_tensors="pt").input_ids, 20)
        repeats.append(Counter(new).most_common(1)[0][1])
    assert sum(r >= 15 for r in repeats) <= 1, repeats


@pytest.mark.parametrize("arch", ARCHS)
def test_same_seed_same_weights_other_seed_differs(arch: str) -> None:
    a, _ = tiny_model(arch, seed=3)
    b, _ = tiny_model(arch, seed=3)
    c, _ = tiny_model(arch, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_global_rng_state_is_left_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_model("llama", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_options_shape_the_model() -> None:
    model, _ = tiny_model("llama", hidden_size=128, num_layers=3, num_heads=8, dtype=torch.bfloat16,
                          rms_norm_eps=1e-5)
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (128, 3)
    assert model.config.num_attention_heads == 8
    assert model.config.rms_norm_eps == 1e-5
    assert next(model.parameters()).dtype == torch.bfloat16


def test_benchmark_shape_defaults() -> None:
    model, _ = tiny_model("llama", hidden_size=1024, num_layers=8)
    assert model.config.num_attention_heads == 16
    assert model.config.intermediate_size == 2816


def test_falcon_and_mpt_are_7b_style() -> None:
    falcon, _ = tiny_model("falcon")
    assert falcon.config.rotary and falcon.config.multi_query
    assert not falcon.config.new_decoder_architecture
    mpt, _ = tiny_model("mpt")
    assert mpt.config.attn_config.alibi


def test_unknown_arch_lists_the_known_ones() -> None:
    with pytest.raises(PromptCacheError, match="llama, falcon, mpt, mistral, qwen2"):
        tiny_model("gpt2")


@pytest.mark.parametrize("text", [
    "def f(x):\n    return x<1 && y>2 & z\n",
    "<schema name=\"a\"><![CDATA[a < b]]></schema>",
    "\ttabs\r\nand  double  spaces",
    "café 日本語 🙂 Ωμέγα",
])
def test_tokenizer_round_trips_any_text(text: str) -> None:
    tok = tiny_tokenizer()
    ids = tok(text).input_ids
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_is_llama2_like() -> None:
    tok = tiny_tokenizer()
    assert tok("hi").input_ids[0] == tok.bos_token_id == 1
    assert tok("hi", add_special_tokens=False).input_ids[0] != tok.bos_token_id
    assert tok.eos_token == "</s>" and tok.eos_token_id == 2
    assert tok.pad_token_id == tok.unk_token_id == 0
    assert tok.chat_template is None
    assert 900 <= len(tok) <= 1100


def test_tokenizer_is_deterministic_and_fresh() -> None:
    a, b = tiny_tokenizer(), tiny_tokenizer()
    assert a is not b
    assert a.get_vocab() == b.get_vocab()


@pytest.mark.parametrize("arch", ARCHS)
def test_save_tiny_round_trips_offline(arch: str, tmp_path) -> None:
    path = save_tiny(tmp_path / arch, arch, seed=5)
    model, tok = tiny_model(arch, seed=5)
    loaded, loaded_tok = load_tiny(path)
    text = "def f(x): return x < 1"
    assert loaded_tok(text).input_ids == tok(text).input_ids
    if arch != "qwen2":  # transformers v5 forces Qwen2Tokenizer on that model type (see save_tiny)
        auto_tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        assert auto_tok(text).input_ids == tok(text).input_ids
    plain = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        assert torch.equal(plain(ids).logits, model(ids).logits)
