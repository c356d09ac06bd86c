"""Model adapters: run an unpatched transformers decoder over tokens at arbitrary positions.

The engine feeds every model the same way: new tokens, their position ids, a `Cache` holding the
spliced states, and the position of every key in that cache. What differs per family is how a
position reaches attention:

- RoPE families (Llama, Mistral, Qwen2, Falcon-rotary, ...): the rotation is applied to keys when
  they are computed, so stored keys carry their position; `position_ids` places the new tokens.
  Nothing else is needed.
- MPT (ALiBi): keys carry no position; the model adds a per-head bias computed from key *indices*
  in the cache, which is wrong once spliced modules leave gaps. `MptAdapter` replaces that bias
  with one computed from the true key positions (see there).

Where new tokens do not all come after every cached token (parameter arguments, cache="false"
modules), attention must follow positions, not cache order: a 4D mask lets a query see exactly
the keys at positions <= its own.

Sliding-window layers (Gemma 2/3's local layers, Mistral with `sliding_window`) see only the keys
of the last `window` *positions*: a query at p sees keys at positions p - window < k <= p. With
spliced modules a gap (a module left out, a parameter slot longer than its argument) counts in
that window as the tokens it stands for would: the window is counted in positions, not in the
tokens present. That is what a full prefill of the whole schema computes when it masks the gap's
tokens out (tests/engine/test_gaps.py), and it keeps every local layer's distances within those
the model was trained on. transformers builds its window from cache indices, which are positions
only in a gapless cache, so once a window can cut anything (`window_binds`) the adapter passes
the masks itself, one per layer type (`window_masks`).

    positions   0 .. 9 [ skipped module 10..29 ] 30 31 32      window = 8
    query at 32 sees, in a local layer:  keys at 25..32 -> only 30, 31, 32 are present
                in a global layer:       every key at <= 32
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
from collections.abc import Sequence
from contextlib import contextmanager

import torch

from ..errors import PromptCacheError
from .batched import DecodeRow, RowsCache, batch_of

logger = logging.getLogger(__name__)


def position_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, dtype: torch.dtype,
                  window: int | None = None) -> torch.Tensor:
    """Additive mask [1, 1, q, kv]: 0 where key position <= query position (and, with a `window`,
    > query position - window), else the dtype's min."""
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= k_pos[None, :] > q_pos[:, None] - window
    mask = torch.zeros(allowed.shape, dtype=dtype, device=q_pos.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


def window_masks(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, dtype: torch.dtype,
                 layer_types: tuple[str, ...]) -> dict[str, torch.Tensor] | torch.Tensor:
    """Additive masks [1, 1, q, kv] by position: global layers see keys at <= the query's position,
    local layers only those less than `window` positions back. One per layer type (a dict, as
    transformers' hybrid models take it); a model without layer types (all local) gets the local one."""
    local = position_mask(q_pos, k_pos, dtype, window)
    if not layer_types:
        return local
    return {"full_attention": position_mask(q_pos, k_pos, dtype), "sliding_attention": local}


def window_binds(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> bool:
    """Whether some key is `window` or more positions before some query (else a window cuts nothing)."""
    return int(q_pos.max()) - int(k_pos.min()) >= window


def needs_position_mask(q_pos: torch.Tensor, past_pos: torch.Tensor | None) -> bool:
    """False when cache order already is position order (the model's own causal mask is right)."""
    if q_pos.numel() > 1 and not bool((q_pos[1:] > q_pos[:-1]).all()):
        return True
    return past_pos is not None and past_pos.numel() > 0 and int(q_pos.min()) <= int(past_pos.max())


ATTENTION = "promptcache"
"""The attention the engine registers with transformers' `AttentionInterface`: SDPA, except for a few
queries (decoding, a short question after a cached prefix), which run as two grouped matmuls
(`grouped_attention`)."""
FEW_QUERIES = 32  # at most this many queries take the grouped-matmul path


def grouped_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """Attention with transformers' `sdpa` signature; a few queries skip SDPA's kernels.

    NOTE: for a few queries over many keys torch's CPU SDPA is slow, in bfloat16 above all (one
    query over 1k keys: ~1 ms per layer, ~10 ms over 3k, where two matmuls take 0.1-0.2 ms): its
    flash kernel works in blocks meant for many queries, and with a mask transformers first
    repeats every key and value for each head of a group. Here the heads of a group share their
    keys (the queries are grouped instead), and the softmax runs in float32. Several queries need
    an explicit mask (a lone query sees every key it is given).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from .batched import current_rows, rows_attention
    from .compiled import BLOCK, FED, SINK, block_attention

    if kwargs.get(BLOCK) is not None:  # the compiled decode step (`compiled.CompiledDecode`)
        return block_attention(module, query, key, value, scaling, kwargs[BLOCK], kwargs[FED], kwargs[SINK]), None
    n = query.shape[2]
    if n > FEW_QUERIES or (n > 1 and attention_mask is None) or dropout or \
            kwargs.get("position_bias") is not None or kwargs.get("softcap"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    rows = current_rows()
    if rows is not None:  # a batched decode step: each row over its own request cache (`batched`)
        return rows_attention(module, query, scaling, rows,
                              lambda q, k, v, mask: _grouped(q, k, v, mask, scaling)), None
    return _grouped(query, key, value, attention_mask, scaling), None


def _grouped(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
             scaling: float | None) -> torch.Tensor:
    """A few queries as two grouped matmuls (see `grouped_attention`); [b, n, heads, d]."""
    # query: [b, heads, n, d]; key, value: [b, kv_heads, keys, d]; mask: [b or 1, 1 or heads, n, keys]
    b, heads, n, d = query.shape
    groups, keys = key.shape[1], key.shape[2]
    q = query.reshape(b, groups, heads // groups * n, d)
    scores = torch.matmul(q, key.transpose(-1, -2)) * (d ** -0.5 if scaling is None else scaling)
    scores = scores.view(b, groups, heads // groups, n, keys)
    if attention_mask is not None:
        mask = attention_mask[..., -keys:]
        mask = mask.reshape(mask.shape[0], groups, heads // groups, n, keys) if mask.shape[1] == heads \
            else mask.unsqueeze(1)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    out = torch.matmul(probs.view(b, groups, heads // groups * n, keys), value)
    return out.view(b, heads, n, value.shape[-1]).transpose(1, 2).contiguous()


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, grouped_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


class Adapter:
    """Runs `model` over tokens at given positions with a cache (RoPE families need nothing more)."""

    def __init__(self, model):
        self.model = model
        cfg = model.config.get_text_config(decoder=True)
        self.config = cfg
        self.num_layers = cfg.num_hidden_layers
        self.max_positions = _max_positions(cfg)
        self.layer_types, self.window = attention_kinds(cfg)
        self.compiled = None  # a `compiled.CompiledDecode` once `compile_decode` ran
        # transformers 5.25 renamed the model's `past_key_values` argument `cache` (the old name warns; gone in 5.40)
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        attn = getattr(model.config, "_attn_implementation", None)
        if _uses_attention_interface(model):
            _register_attention()
            if attn != ATTENTION:
                logger.info("attention implementation %s -> %s (SDPA; a few queries: grouped matmuls)", attn, ATTENTION)
                model.set_attn_implementation(ATTENTION)
        elif attn not in ("sdpa", "eager", None):
            # NOTE: custom 4D position masks need an attention kernel that takes masks.
            logger.info("switching attention implementation from %s to sdpa", attn)
            model.set_attn_implementation("sdpa")

    @functools.cached_property
    def kv_geometry(self) -> tuple[int, int]:
        """(kv_heads, head_dim), read off a one-token forward rather than guessed from the config."""
        from transformers.cache_utils import DynamicCache

        probe = DynamicCache()
        ids = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        with torch.inference_mode():
            self.model(input_ids=ids, use_cache=True, **{self.cache_arg: probe})
        k = probe.layers[0].keys
        return k.shape[1], k.shape[-1]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def compile_decode(self, options: dict | None = None, backend: str = "inductor") -> None:
        """Decode through a compiled one-token step from now on (`compiled.CompiledDecode`; the first
        token compiles it, minutes on a small CPU).

        Raises:
            PromptCacheError: the model's attention does not go through transformers' AttentionInterface.
        """
        from .compiled import CompiledDecode

        if self.window is not None:
            raise PromptCacheError(f"compile_decode does not support sliding-window attention "
                                   f"({self.config.model_type}: local layers see the last {self.window} positions; "
                                   "the compiled step attends to every key); leave compile_decode off for this model")
        if self.model.config._attn_implementation != ATTENTION or not self._attention_gets_model_kwargs():
            raise PromptCacheError(f"compile_decode needs a model whose attention goes through transformers' "
                                   f"AttentionInterface and receives the model's keyword arguments (llama, "
                                   f"mistral, qwen2, ...); {self.config.model_type} does not")
        self.compiled = CompiledDecode(self.model, options, backend)

    def _attention_gets_model_kwargs(self) -> bool:
        """Whether keyword arguments given to the model reach the attention function of every layer (the
        compiled step hands its cache block over that way). One eager token through `compiled.block_attention`
        over an empty one-slot block; transformers 5.25's Falcon, say, dispatches through the interface but
        its decoder layers drop the keyword arguments."""
        from .compiled import BLOCK, FED, SINK

        kv_heads, head_dim = self.kv_geometry
        block = torch.zeros(2, self.num_layers, 1, kv_heads, 1, head_dim, dtype=self.dtype, device=self.device)
        ids = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        sink: list = []
        with torch.inference_mode():
            self.model(input_ids=ids, position_ids=torch.zeros_like(ids), use_cache=False, logits_to_keep=1,
                       **{BLOCK: block, FED: torch.tensor(0, device=self.device), SINK: sink})
        return len(sink) == self.num_layers

    def decode(self, token: int, position: int, cache, k_pos: torch.Tensor, fed: int) -> torch.Tensor:
        """Logits [vocab] of one generated `token` at `position`, after the `fed` keys of `cache`.

        Decoding is in order: every key in the cache is at a position before `position`. `k_pos[fed]`
        is set to `position`.
        """
        k_pos[fed] = position
        if self.compiled is not None:
            return self.compiled(token, position, cache, fed)
        ids = torch.tensor([[token]], dtype=torch.long, device=k_pos.device)
        return self.forward(ids, k_pos[fed:fed + 1], k_pos[:fed + 1], cache, logits_to_keep=1, in_order=True)[0, -1]

    @property
    def batches(self) -> bool:
        """Whether `decode_rows` feeds several rows in one forward (the model's attention dispatches
        through transformers' AttentionInterface to the engine's, and decoding is not compiled)."""
        return self.model.config._attn_implementation == ATTENTION and self.compiled is None

    @functools.cached_property
    def layer_windows(self) -> tuple[int | None, ...]:
        """Per decoder layer, its sliding window (in positions) or None (a global layer)."""
        if self.window is None:
            return (None,) * self.num_layers
        if not self.layer_types:
            return (self.window,) * self.num_layers
        return tuple(self.window if kind == "sliding_attention" else None for kind in self.layer_types)

    def decode_rows(self, rows: Sequence[DecodeRow]) -> torch.Tensor:
        """Logits [rows, vocab] of each row's token after its own cache (`batched.DecodeRow`), in one
        forward where the model allows (`batches`), else row by row. Each row's cache gets its token's
        state in its next slot, and `key_positions[fed]` is set to its position."""
        if len(rows) == 1 or not self.batches:
            return torch.stack([self.decode(r.token, r.position, r.cache, r.key_positions, r.fed) for r in rows])
        device = rows[0].key_positions.device
        for r in rows:
            r.key_positions[r.fed] = r.position
        ids = torch.tensor([[r.token] for r in rows], dtype=torch.long, device=device)
        pos = torch.tensor([[r.position] for r in rows], dtype=torch.long, device=device)
        cache = RowsCache(rows, self.layer_windows)
        with torch.inference_mode(), batch_of(cache):
            out = self.model(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=1,
                             **{self.cache_arg: cache})
        return out.logits[:, -1]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, cache,
                logits_to_keep: int = 0, in_order: bool | None = None) -> torch.Tensor:
        """Logits for input_ids [batch, q] at positions q_pos [q].

        `cache` holds the past keys and is updated in place; k_pos [past + q] is the position of
        every key after the update (past ones, then q_pos). `in_order=True` promises that cache order
        is position order (decoding), skipping the check. Returns [batch, kept, vocab].
        """
        mask = None
        past_pos = k_pos[: k_pos.numel() - q_pos.numel()]
        if self.window is not None and window_binds(q_pos, k_pos, self.window):
            mask = window_masks(q_pos, k_pos, self.window, self.dtype, self.layer_types)
        elif not in_order and needs_position_mask(q_pos, past_pos):
            mask = position_mask(q_pos, k_pos, self.dtype)
        if mask is None and self._compiled_takes(input_ids, cache, past_pos.numel(), logits_to_keep):
            return self.compiled.forward(input_ids[0].tolist(), q_pos.tolist(), cache, past_pos.numel())[None, None]
        with self.positions(k_pos):
            out = self.model(input_ids=input_ids, position_ids=q_pos[None].expand(input_ids.shape[0], -1),
                             attention_mask=mask, use_cache=True, logits_to_keep=logits_to_keep,
                             **{self.cache_arg: cache})
        return out.logits

    def _compiled_takes(self, input_ids: torch.Tensor, cache, past: int, logits_to_keep: int) -> bool:
        """Whether the compiled few-token step runs this in-order forward (`compile_decode`): one
        sequence of `compiled.MIN_FEW`..`FEW_TOKENS` tokens after the `past` filled slots of a request
        cache's block, only the last token's logits wanted."""
        from .compiled import FEW_TOKENS, MIN_FEW

        return (self.compiled is not None and input_ids.shape[0] == 1 and logits_to_keep == 1
                and MIN_FEW <= input_ids.shape[1] <= FEW_TOKENS and getattr(cache, "block", None) is not None
                and all(layer.length == past for layer in cache.layers))

    @contextmanager
    def positions(self, k_pos: torch.Tensor):
        yield


class MptAdapter(Adapter):
    """MPT: ALiBi from true key positions.

    MPT builds bias[h, k] = slope_h * (k - (K - 1)) from the key index k in a cache of K keys, and
    relies on softmax being shift-invariant per query. With spliced modules the index is not the
    position: a module after a skipped one would look closer than it is. A forward pre-hook on each
    attention block swaps in bias[h, k] = slope_h * (pos_k - max_pos), the same formula over true
    positions (identical to MPT's when positions are 0..K-1). The positions are thread-local, so
    concurrent requests on one model never see each other's; outside `positions()` the hook is
    inert and the model is plain MPT.
    """

    def __init__(self, model):
        super().__init__(model)
        from transformers.models.mpt.modeling_mpt import MptAttention, build_mpt_alibi_tensor

        cfg = self.config
        if getattr(cfg.attn_config, "alibi", True) is False:
            raise PromptCacheError("MPT without ALiBi is not supported")
        # slopes: [heads, 1, 1]; bias for distance -1 is -slope. On the model's device from the start,
        # so the per-forward .to() below is a no-op (unless the model is moved later).
        slopes = -build_mpt_alibi_tensor(cfg.n_heads, 2, cfg.attn_config.alibi_bias_max)[:, :, :1]
        self.slopes = slopes.to(self.device)
        # NOTE: one thread-local per model, shared by every adapter (engine) built on it: the hooks
        # are registered once and must see whichever engine is running.
        if not hasattr(model, "_promptcache_alibi"):
            model._promptcache_alibi = threading.local()
        self.local = model._promptcache_alibi
        for mod in model.modules():
            if isinstance(mod, MptAttention) and not getattr(mod, "_promptcache_hooked", False):
                mod.register_forward_pre_hook(self._hook, with_kwargs=True)
                mod._promptcache_hooked = True

    def _hook(self, module, args, kwargs):
        bias = getattr(self.local, "bias", None)
        if bias is not None:
            kwargs["position_bias"] = bias
        return args, kwargs

    @contextmanager
    def positions(self, k_pos: torch.Tensor):
        rel = (k_pos - k_pos.max()).to(torch.int32)
        # bias: [heads, 1, kv]
        self.local.bias = rel.view(1, 1, -1) * self.slopes.to(k_pos.device)
        try:
            yield
        finally:
            self.local.bias = None


def _uses_attention_interface(model) -> bool:
    """Whether the model's attention dispatches through transformers' `AttentionInterface` (Llama,
    Mistral, Qwen2, Falcon from transformers 5.25 on, ...; not MPT, which branches on the implementation's name
    itself)."""
    import sys

    return hasattr(sys.modules.get(type(model).__module__), "ALL_ATTENTION_FUNCTIONS")


ATTENTION_KINDS = ("full_attention", "sliding_attention")


def attention_kinds(cfg) -> tuple[tuple[str, ...], int | None]:
    """(each layer's attention kind, the sliding window) of a decoder config: kinds are empty when the
    config names none (every layer alike), the window None when no layer is windowed.

    Raises:
        PromptCacheError: a kind the adapter cannot mask by position (chunked, linear attention, ...).
    """
    kinds = tuple(getattr(cfg, "layer_types", None) or ())
    unknown = sorted(set(kinds) - set(ATTENTION_KINDS))
    if unknown:
        raise PromptCacheError(f"model type '{cfg.model_type}' has {', '.join(unknown)} layers, which promptcache "
                               f"does not support; supported layer kinds: {', '.join(ATTENTION_KINDS)}")
    window = getattr(cfg, "sliding_window", None)
    windowed = "sliding_attention" in kinds if kinds else getattr(cfg, "use_sliding_window", True)
    return kinds, window if windowed and isinstance(window, int) and window > 0 else None


def _max_positions(cfg) -> int:
    for name in ("max_position_embeddings", "max_seq_len", "n_positions", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1 << 30


def adapter_for(model) -> Adapter:
    """The adapter for `model`'s family; RoPE decoders need no special handling."""
    cfg = model.config
    if cfg.model_type == "mpt":
        return MptAdapter(model)
    if cfg.model_type == "falcon" and getattr(cfg, "alibi", False):
        raise PromptCacheError("Falcon with alibi=True is not supported (Falcon-7B/40B use rotary; "
                               "rotary Falcon models are supported)")
    if cfg.model_type in ("bloom",) or getattr(cfg, "alibi", False):
        raise PromptCacheError(f"model type '{cfg.model_type}' uses ALiBi through a path promptcache "
                               "does not adapt; supported: RoPE decoders (llama, mistral, qwen2, falcon, ...) and mpt")
    return Adapter(model)


def config_max_positions(cfg) -> int:
    """The context window a model config declares (what `Adapter.max_positions` holds), without the model."""
    return _max_positions(cfg)
