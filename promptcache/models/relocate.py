"""Model-level mechanics selective recompute needs: moving stored keys, and running a few layers only.

Moving states to new positions (closing the gaps a prompt leaves):

- RoPE families rotate a key by its position when it is computed, so a key stored at position p
  becomes the key at p + d by one more rotation by d (rotations of one frequency compose by adding
  angles). `KeyMover.move` applies it with the model's own rotary embedding, whatever its
  frequencies (llama3 or linear scaling included); an `attention_scaling` the embedding folds into
  cos/sin (YaRN, LongRoPE) is divided out, so it is not applied twice. Models whose layer kinds
  rotate by different frequencies (Gemma 3: base 10k on local layers, 1M on global ones) move each
  layer's keys by its own kind's rotation (`move(..., layer=i)`).
- ALiBi (MPT) keys carry no position: the adapter builds the bias from the key positions it is
  given, so moving is free.
- Anything else (learned absolute positions, interleaved rotary as in GPT-J) cannot be moved:
  `key_mover` returns None and callers keep the stored positions.

Probing: `probe_forward` runs a forward that stops after decoder layer `layer`, leaving that
layer's (and the earlier layers') keys and values of the new tokens in the cache. It is how
recompute measures, at an early layer, how far stored states are from the prompt's context. The
stop is a forward hook that raises; which layer stops is thread-local, so concurrent requests on
one model never stop each other's forwards.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

ROTATE_HALF_FAMILIES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "falcon", "gemma", "gemma2",
                        "gemma3_text", "olmo", "olmo2", "starcoder2")
"""Families whose rotary embedding rotates half the head dims against the other half (HF's `rotate_half`)."""


@dataclass(frozen=True)
class KeyMover:
    """Moves stored keys to new positions: by rotation (`rotary` set) or by nothing at all (ALiBi).

    `layer_types`: each layer's kind, where the rotary embedding rotates each kind by its own
    frequencies (it takes the kind as an argument, as Gemma 3's does); empty where one rotation
    serves every layer.
    """

    rotary: torch.nn.Module | None
    layer_types: tuple[str, ...] = ()

    def move(self, keys: torch.Tensor, delta: torch.Tensor, layer: int = 0) -> torch.Tensor:
        """Keys [batch, kv_heads, n, head_dim] of decoder layer `layer` computed at positions p, as
        they are at p + delta [n].

        Returns a new tensor (ALiBi: `keys` itself, positions live in the bias).
        """
        if self.rotary is None:
            return keys
        x = keys.float()
        kind = (self.layer_types[layer],) if self.layer_types else ()
        cos, sin = self.rotary(x, delta.to(keys.device)[None], *kind)  # cos, sin: [1, n, rot]
        scale = float(getattr(self.rotary, f"{kind[0]}_attention_scaling" if kind else "attention_scaling", 1.0)
                      or 1.0)
        cos, sin = (cos.float() / scale)[:, None], (sin.float() / scale)[:, None]  # [1, 1, n, rot]
        rot = cos.shape[-1]
        head = x[..., :rot]
        half = rot // 2
        turned = torch.cat((-head[..., half:], head[..., :half]), dim=-1)
        moved = torch.cat((head * cos + turned * sin, x[..., rot:]), dim=-1)
        return moved.to(keys.dtype)


def key_mover(model) -> KeyMover | None:
    """How `model`'s stored keys move to new positions, or None when they cannot be moved."""
    cfg = model.config
    if cfg.model_type == "mpt":
        return KeyMover(None)
    if cfg.model_type not in ROTATE_HALF_FAMILIES:
        logger.info("model type %s: stored keys cannot be moved to new positions; gaps stay", cfg.model_type)
        return None
    kinds = tuple(getattr(cfg.get_text_config(decoder=True), "layer_types", None) or ())
    for name, mod in model.named_modules():
        if name.endswith("rotary_emb") and hasattr(mod, "inv_freq"):
            return KeyMover(mod)
        if name.endswith("rotary_emb") and kinds and all(hasattr(mod, f"{k}_inv_freq") for k in kinds):
            return KeyMover(mod, kinds)
    logger.info("model type %s has no rotary embedding module; gaps stay", cfg.model_type)
    return None


class _Stop(Exception):
    """Raised by the probe hook after the probed layer ran."""


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's decoder layers: the first ModuleList as long as the config's layer count."""
    n = model.config.get_text_config(decoder=True).num_hidden_layers
    for mod in model.modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n:
            return mod
    raise AssertionError(f"no list of {n} decoder layers in {type(model).__name__}")  # pragma: no cover


def _install_hooks(model) -> threading.local:
    local = getattr(model, "_promptcache_probe", None)
    if local is not None:
        return local
    local = threading.local()
    for i, layer in enumerate(decoder_layers(model)):
        def stop_after(module, args, output, i=i):
            if getattr(local, "layer", None) == i:
                raise _Stop
        layer.register_forward_hook(stop_after)
    model._promptcache_probe = local
    return local


def probe_forward(adapter, ids: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, cache,
                  layer: int) -> None:
    """Run ids [1, q] at q_pos through decoder layers 0..`layer` only; their keys/values land in `cache`.

    Layers after `layer` are not run and their caches not written: the caller resets the cache's
    layer lengths afterwards.
    """
    local = _install_hooks(adapter.model)
    local.layer = layer
    try:
        adapter.forward(ids, q_pos, k_pos, cache, logits_to_keep=1)
    except _Stop:
        pass
    else:  # pragma: no cover - the hook always fires
        raise AssertionError("the probe ran every layer")
    finally:
        local.layer = None
