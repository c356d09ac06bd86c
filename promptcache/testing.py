"""Tiny, offline, seeded models and a tokenizer for tests, the demo and the benchmarks.

Nothing here downloads anything: the tokenizer is a SentencePiece BPE model trained in-process on a
deterministic synthetic corpus, and the models are transformers' own classes built from config
objects with random weights. They produce meaningless text; they exist so that "cached output equals
uncached output" can be checked exactly and quickly on a CPU.

    model, tok = tiny_model("falcon")
    ids = tok("def f(x): return x < 1", return_tensors="pt").input_ids   # starts with BOS
"""

from __future__ import annotations

import atexit
import functools
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch
from transformers import (
    AutoModelForCausalLM,
    FalconConfig,
    Gemma3TextConfig,
    GlmConfig,
    GPTNeoXConfig,
    GraniteConfig,
    LlamaConfig,
    LlamaTokenizer,
    MistralConfig,
    MptConfig,
    Olmo3Config,
    Phi3Config,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    SmolLM3Config,
)

from promptcache.errors import PromptCacheError

ARCHS: tuple[str, ...] = ("llama", "falcon", "mpt", "mistral", "qwen2", "gemma3")
TINY_WINDOW = 8  # tiny gemma3's sliding window: prompts of a few dozen tokens reach well past it
FIXED_POSITION_ARCHS: tuple[str, ...] = ("phi3", "granite", "smollm3", "gpt_neox", "olmo3", "glm")
"""RoPE families whose stored keys promptcache cannot move (`models.relocate.key_mover` is None): recompute
keeps the gaps a prompt leaves. Also built by `tiny_model`, for tests of that group."""
_FIXED_POSITION_CONFIGS = {"phi3": Phi3Config, "granite": GraniteConfig, "smollm3": SmolLM3Config,
                           "olmo3": Olmo3Config, "glm": GlmConfig}

VOCAB_SIZE = 1000
# The context window of tiny models: every shipped example in schemas/ fits with room to answer
# (the longest, codegen, lays out to ~7.4k positions under the tiny tokenizer). RoPE and ALiBi are
# computed per forward, so a long window costs nothing until it is used.
MAX_POSITIONS = 16384

_WORDS = (
    "the a of to and in is it you that he was for on are with as I his they be at one have this from or had"
    " by hot word but what some we can out other were all there when up use your how said an each she which"
    " do their time if will way about many then them write would like so these her long make thing see him"
    " two has look more day could go come did number sound no most people my over know water than call"
    " first who may down side been now find any new work part take get place made live where after back"
    " little only round man year came show every good me give our under name very through just form"
    " sentence great think say help low line differ turn cause much mean before move right boy old too"
    " same tell does set three want air well also play small end put home read hand port large spell add"
    " even land here must big high such follow act why ask men change went light kind off need house"
    " picture try us again animal point mother world near build self earth father trip travel plan days"
    " city hotel flight budget question answer document summary code function"
).split()
_CODE = (
    "def return class import from self None True False if else elif for while print lambda yield"
    " ( ) [ ] { } < > & = == != <= >= + - * / % : ; , . ' \" # -> => && || <html> </div> <p> &amp;"
    " 0 1 2 3 42 x y i n s k v [INST] [/INST] <<SYS>> <</SYS>> <|im_start|> <|im_end|>"
    " System: User: Assistant:"
).split()


def _corpus(lines: int = 3000) -> Iterator[str]:
    """A deterministic mix of English-ish sentences and code-ish token soup."""
    rng = random.Random(0)
    for i in range(lines):
        n = rng.randint(4, 20)
        if i % 3 == 0:
            yield " ".join(rng.choice(_CODE + _WORDS) for _ in range(n))
        else:
            sentence = " ".join(rng.choice(_WORDS) for _ in range(n))
            yield sentence[0].upper() + sentence[1:] + rng.choice(".?!,:")


@functools.cache
def _tokenizer_dir() -> Path:
    """Train the SentencePiece model once per process into a temp dir (removed at exit)."""
    directory = Path(tempfile.mkdtemp(prefix="promptcache-tiny-tok-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=_corpus(), model_prefix=str(directory / "tokenizer"), vocab_size=VOCAB_SIZE,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
    )
    return directory


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A fresh Llama-style tokenizer (~1000 pieces, byte fallback: any text round-trips).

    Like Llama 2's, it prepends BOS (`<s>`, id 1) when encoding with special tokens and has EOS
    (`</s>`, id 2). transformers v5's `LlamaTokenizer` does not add BOS by default, so it is built
    with `add_bos_token=True`. It has no pad piece of its own: `pad_token` is set to `<unk>` (id 0)
    so batching works. It has no `chat_template`. Each call returns a new instance, so callers may
    mutate it (e.g. set a chat template) freely.
    """
    return LlamaTokenizer.from_pretrained(str(_tokenizer_dir()), add_bos_token=True, pad_token="<unk>")


def _default_heads(hidden_size: int) -> int:
    return max(4, hidden_size // 64)


def _config(arch: str, tok: PreTrainedTokenizerBase, hidden_size: int, num_layers: int, num_heads: int,
            max_positions: int, overrides: dict[str, Any]) -> PreTrainedConfig:
    """The config for one architecture family, shaped like its best-known 7B member, but tiny."""
    # NOTE: word embeddings are untied everywhere. Falcon and MPT tie them by default, and a random
    # tied model mostly predicts its last input token again, which makes greedy decodes degenerate.
    common: dict[str, Any] = dict(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )
    kv_heads = max(1, num_heads // 2) if num_heads % 2 == 0 else num_heads
    rope_family: dict[str, Any] = dict(
        hidden_size=hidden_size, intermediate_size=int(hidden_size * 11 // 4), num_hidden_layers=num_layers,
        num_attention_heads=num_heads, max_position_embeddings=max_positions,
    )
    if arch == "llama":  # Llama 2 7B: multi-head attention, RoPE.
        cfg = LlamaConfig, dict(rope_family, num_key_value_heads=num_heads)
    elif arch == "mistral":  # Mistral 7B: grouped-query attention; sliding window off (full attention).
        cfg = MistralConfig, dict(rope_family, num_key_value_heads=kv_heads, sliding_window=None)
    elif arch == "qwen2":  # Qwen2: grouped-query attention, q/k/v biases.
        cfg = Qwen2Config, dict(rope_family, num_key_value_heads=kv_heads)
    elif arch == "falcon":  # Falcon 7B: rotary, multi-query, parallel attention + MLP.
        cfg = FalconConfig, dict(
            hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
            alibi=False, multi_query=True, new_decoder_architecture=False, parallel_attn=True, bias=False,
            max_position_embeddings=max_positions,
        )
    elif arch == "mpt":  # MPT 7B: ALiBi, no positional embeddings.
        cfg = MptConfig, dict(
            d_model=hidden_size, n_layers=num_layers, n_heads=num_heads, max_seq_len=max_positions,
            expansion_ratio=4,
        )
    elif arch == "gpt_neox":  # Pythia: partial rotary (a quarter of each head), parallel attention + MLP.
        cfg = GPTNeoXConfig, dict(rope_family, intermediate_size=hidden_size * 4)
    elif arch in _FIXED_POSITION_CONFIGS:  # grouped-query attention, RoPE (see FIXED_POSITION_ARCHS)
        cfg = _FIXED_POSITION_CONFIGS[arch], dict(rope_family, num_key_value_heads=kv_heads)
    elif arch == "gemma3":  # Gemma 3: sliding-window (local) layers with a global layer between them.
        cfg = Gemma3TextConfig, dict(
            rope_family, num_key_value_heads=kv_heads, head_dim=hidden_size // num_heads,
            query_pre_attn_scalar=hidden_size // num_heads, sliding_window=TINY_WINDOW,
            layer_types=[_gemma3_layer_type(i) for i in range(num_layers)],
        )
    else:
        raise PromptCacheError(f"unknown tiny architecture {arch!r}; expected one of "
                               f"{', '.join(ARCHS + FIXED_POSITION_ARCHS)}")
    config_class, kwargs = cfg
    return config_class(**{**common, **kwargs, **overrides})


def _gemma3_layer_type(i: int) -> str:
    """Local and global layers alternate, local first (Gemma 3 has five local layers per global one;
    two layers, the tiny default, hold one of each)."""
    return "full_attention" if i % 2 else "sliding_attention"


def tiny_config(arch: str = "llama", tokenizer: PreTrainedTokenizerBase | None = None, *, hidden_size: int = 64,
                num_layers: int = 2, num_heads: int | None = None, max_positions: int = MAX_POSITIONS,
                **config_overrides: Any) -> PreTrainedConfig:
    """The config `tiny_model` builds its model from (same arguments), e.g. to lay out a schema without weights."""
    tok = tiny_tokenizer() if tokenizer is None else tokenizer
    heads = _default_heads(hidden_size) if num_heads is None else num_heads
    return _config(arch, tok, hidden_size, num_layers, heads, max_positions, config_overrides)


def tiny_model(arch: str = "llama", *, seed: int = 0, hidden_size: int = 64, num_layers: int = 2,
               num_heads: int | None = None, max_positions: int = MAX_POSITIONS, dtype: torch.dtype = torch.float32,
               **config_overrides: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Build a randomly initialised causal LM of the given family, in eval mode, and its tokenizer.

    Shapes: head count defaults to `max(4, hidden_size // 64)` (head_dim 16 at the default width,
    64 at benchmark widths such as `hidden_size=1024`); the MLP is `2.75 * hidden_size` wide for
    the RoPE families (4x for Falcon and MPT, as in their 7B models); Mistral and Qwen2 use half as
    many key/value heads as query heads, Falcon a single one. Weights use transformers' default
    init (std 0.02) under `seed`, without touching the caller's global RNG state.

    Args:
        arch: one of `ARCHS` or `FIXED_POSITION_ARCHS`.
        seed: the same seed gives identical weights.
        hidden_size: model width.
        num_layers: decoder layers.
        num_heads: attention heads; None for the default above.
        max_positions: the context window (`max_position_embeddings`, MPT's `max_seq_len`).
        dtype: parameter dtype.
        **config_overrides: passed to the config class last, overriding anything above.

    Returns:
        `(model, tokenizer)`.

    Raises:
        PromptCacheError: `arch` is not one of those.
    """
    tok = tiny_tokenizer()
    config = tiny_config(arch, tok, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                         max_positions=max_positions, **config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype).eval(), tok


def save_tiny(path: str | Path, arch: str = "llama", **kw: Any) -> Path:
    """Save a tiny model and its tokenizer so that `from_pretrained(path)` works offline.

    `AutoModelForCausalLM.from_pretrained(path)` works for every arch, and so does
    `AutoTokenizer.from_pretrained(path)` except for "qwen2": transformers v5 forces its own
    byte-level `Qwen2Tokenizer` on that model type, whatever the saved tokenizer class says.
    `load_tiny(path)` (or `LlamaTokenizer.from_pretrained(path)`) loads the right one for all.

    Args:
        path: target directory (created if missing).
        arch: one of `ARCHS` or `FIXED_POSITION_ARCHS`.
        **kw: passed to `tiny_model`.

    Returns:
        The directory, as a `Path`.
    """
    path = Path(path)
    model, tok = tiny_model(arch, **kw)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def load_tiny(path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load what `save_tiny` wrote, offline, as `(model, tokenizer)` (model in eval mode)."""
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    return model.eval(), LlamaTokenizer.from_pretrained(str(path), local_files_only=True)
