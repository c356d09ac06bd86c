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

from ..errors import PromptError
from ..markup.layout import SchemaLayout

SAMPLE = 4096  # values sampled per parameter tensor by the opt-in "sampled" fingerprint
FINGERPRINTS = ("full", "sampled")


def weights_fingerprint(model, mode: str = "full") -> str:
    """A hash of every parameter's name, shape, dtype and values.

    mode="full" (the default) hashes every byte of every weight (blake2b, ~1 GB/s on one core;
    computed once per engine, only when a store or the response cache needs the identity).
    mode="sampled" hashes a strided sample of each tensor instead: seconds faster on a 7B model, but
    two checkpoints that differ only off the sample grid get the same fingerprint (and would share
    stored states): an explicit opt-in for stores that only ever see one model.
    """
    if mode not in FINGERPRINTS:
        raise PromptError(f"unknown fingerprint mode {mode!r}; valid: {', '.join(FINGERPRINTS)}")
    h = hashlib.blake2b(digest_size=32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            if mode == "sampled":
                flat = flat[:: max(1, flat.numel() // SAMPLE)][:SAMPLE]
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}:{mode}".encode())
            # NOTE: viewed as bytes, so any dtype (bfloat16 too) hashes exactly what is stored
            h.update(flat.contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    blob = json.dumps([type(tokenizer).__name__, vocab, special], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def engine_identity(model, tokenizer, dtype: torch.dtype, chat, fingerprint: str = "full",
                    decode: str = "weights") -> dict[str, str]:
    """`decode`: which weights one-token steps read ("weights", or "int8": `models.int8`)."""
    cfg = model.config.to_json_string(use_diff=False)
    return {
        "model": str(getattr(model.config, "_name_or_path", "")),
        "weights": weights_fingerprint(model, fingerprint),
        "config": hashlib.sha256(cfg.encode()).hexdigest(),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "dtype": str(dtype),
        "decode": decode,
        "chat": json.dumps([chat.name, sorted(chat.roles.items()), chat.generation_prompt, list(chat.stop),
                            chat.start, chat.default_system, chat.user_after_system,
                            hashlib.sha256((chat.template or "").encode()).hexdigest()]),
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
