"""What a stored state depends on, hashed: so a store never serves another model's states.

A module's keys/values depend on the model (weights and config), the tokenizer, the KV dtype,
the chat format (it shapes the tokens) and every token before and including the module in the
pass that encoded it, at their positions. `module_contexts` gives that token context; the disk key
hashes it with the engine's identity.
"""

from __future__ import annotations

import hashlib
import json

import torch

from ..markup.layout import SchemaLayout

SAMPLE = 4096  # values sampled per parameter tensor for the weights fingerprint


def weights_fingerprint(model) -> str:
    """sha256 over every parameter's name, shape, dtype and a strided sample of its values.

    NOTE: hashing all weights of a 7B model would take seconds; a strided sample of every tensor
    tells apart checkpoints and random initialisations alike.
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // SAMPLE)
            sample = flat[::step][:SAMPLE].float().cpu().contiguous()
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    blob = json.dumps([type(tokenizer).__name__, vocab, special], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def engine_identity(model, tokenizer, dtype: torch.dtype, chat) -> dict[str, str]:
    cfg = model.config.to_json_string(use_diff=False)
    return {
        "model": str(getattr(model.config, "_name_or_path", "")),
        "weights": weights_fingerprint(model),
        "config": hashlib.sha256(cfg.encode()).hexdigest(),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "dtype": str(dtype),
        "chat": json.dumps([chat.name, sorted(chat.roles.items()), chat.generation_prompt]),
    }


def module_contexts(layout: SchemaLayout) -> dict[str, str]:
    """For each module: a sha256 of the (token, position) sequence its states were computed from."""
    full: dict[int, list[tuple[int, int]]] = {}
    out: dict[str, str] = {}
    for i, p in enumerate(layout.passes):
        prefix = full[p.parent][: p.prefix_len] if p.parent is not None else []
        seq = prefix + list(zip(p.token_ids, p.positions))
        full[i] = seq
        last: dict[str, int] = {}
        for j, owner in enumerate(p.owners):
            if owner is not None:
                last[owner] = len(prefix) + j
        for owner, end in last.items():
            ctx = seq[: end + 1]
            own = [(t, pos) for (t, pos), o in zip(seq[len(prefix):], p.owners) if o == owner]
            blob = json.dumps([ctx, own, owner]).encode()
            out[owner] = hashlib.sha256(blob).hexdigest()
    return out
