"""A compiled decode step: one token through the model per call, `torch.compile`d as gpt-fast does.

Decoding a small model on a CPU is bound by per-op dispatch and by the weights' memory traffic, not
by arithmetic. Inductor with `freezing` (weights become constants, prepacked) and `max_autotune`
(its C++ GEMM micro-kernels, which read bfloat16 weights about twice as fast as oneDNN's one-row
matmul on AVX512-BF16) turns the whole forward of one token into a few fused kernels.
NOTE: measured on SmolLM2-135M, 2-core EPYC (2026-11-21): the generated code still calls the extern
`torch.mm` for the 211 matmuls of a token (85% of its time), and decoding is 1.09x eager bfloat16;
with `models.int8` (int8 weights for one-row steps) the matmuls are cheap and the compiled step is
1.6-1.9x eager int8 decoding (0.65-0.79x llama.cpp's tokens/s).

The request's cache block is only read inside the compiled graph. Writing the new token's keys and
values into it there would mutate 60 views of one tensor (every layer's keys and values), which
torch's functionalization turns into copies of the whole block (seconds per token). Instead:

    block (read-only)   [ slots 0 .. fed-1 ][ fed ... capacity ]      per layer: keys, values
    the new token       attends to slots < fed and to its own key (`block_attention`)
    graph outputs       logits, and the token's keys/values of every layer [2, layers, 1, kv, 1, d]
    after the graph     one copy into slot `fed` of the block (eager), layer lengths + 1

Shapes are static but the block's capacity, which is marked dynamic: one compilation serves every
request (the first call compiles, minutes on a small CPU; later processes reuse inductor's on-disk
cache). Concurrent requests call the same compiled step with their own blocks; the first call
compiles under a lock.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

logger = logging.getLogger(__name__)

BLOCK = "promptcache_block"  # model kwargs that reach the attention function (see `block_attention`)
FED = "promptcache_fed"
SINK = "promptcache_sink"
INDUCTOR_OPTIONS = {"freezing": True, "max_autotune": True}


def block_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None,
                    block: torch.Tensor, fed: torch.Tensor, sink: list) -> torch.Tensor:
    """One query over the first `fed` slots of `block` (this layer's) and its own key; [b, 1, heads, d].

    query: [b, heads, 1, d]; key, value: [b, kv_heads, 1, d] (the new token's, already rotated);
    block: [2, layers, b, kv_heads, capacity, d]. The new key/value are appended to `sink`.
    """
    b, heads, _, d = query.shape
    groups = key.shape[1]
    q = query.reshape(b, groups, heads // groups, d)
    scale = d ** -0.5 if scaling is None else scaling
    past_k, past_v = block[0, module.layer_idx], block[1, module.layer_idx]  # [b, kv_heads, capacity, d]
    capacity = past_k.shape[2]
    past = torch.matmul(q, past_k.transpose(-1, -2)) * scale  # [b, kv_heads, group, capacity]
    past = past.masked_fill((torch.arange(capacity, device=q.device) >= fed).view(1, 1, 1, capacity), float("-inf"))
    own = torch.matmul(q, key.transpose(-1, -2)) * scale  # [b, kv_heads, group, 1]
    probs = torch.softmax(torch.cat([past, own], dim=-1), dim=-1, dtype=torch.float32).to(value.dtype)
    out = torch.matmul(probs[..., :capacity], past_v) + probs[..., capacity:] * value
    sink.append((key, value))
    return out.reshape(b, 1, heads, value.shape[-1])


class CompiledDecode:
    """The compiled one-token forward of a model whose attention is `adapter.ATTENTION`.

    Args:
        model: the transformers causal LM (its attention must dispatch through the AttentionInterface).
        options: inductor options (default `INDUCTOR_OPTIONS`).
        backend: `torch.compile`'s backend ("eager" traces the graph without generating code: tests).
    """

    def __init__(self, model, options: dict | None = None, backend: str = "inductor"):
        self.model = model
        self.options = dict(INDUCTOR_OPTIONS if options is None else options)
        self._step = torch.compile(self._forward, backend=backend,
                                   options=self.options if backend == "inductor" else None)
        self._lock = threading.Lock()
        self._ready = False
        self.compile_s: float | None = None  # seconds the first call took (compilation included)

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, block: torch.Tensor, fed: torch.Tensor):
        sink: list = []
        logits = self.model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=1,
                            **{BLOCK: block, FED: fed, SINK: sink}).logits
        keys = torch.stack([k for k, _ in sink])
        values = torch.stack([v for _, v in sink])
        return logits, torch.stack([keys, values])  # [2, layers, b, kv_heads, 1, d]

    def __call__(self, token: int, position: int, cache, fed: int) -> torch.Tensor:
        """Logits [vocab] of `token` at `position` after the first `fed` slots of `cache` (a
        `kv.cache.RequestCache`), whose slot `fed` and layer lengths it then fills."""
        block = cache.block
        device = block.device
        ids = torch.tensor([[token]], dtype=torch.long, device=device)
        pos = torch.tensor([[position]], dtype=torch.long, device=device)
        torch._dynamo.mark_dynamic(block, 4)
        args = (ids, pos, block, torch.tensor(fed, dtype=torch.long, device=device))
        if not self._ready:
            with self._lock:
                logits, new = self._first(*args)
        else:
            with torch.inference_mode():
                logits, new = self._step(*args)
        block[:, :, :, :, fed:fed + 1].copy_(new)
        for layer in cache.layers:
            layer.length = fed + 1
        return logits[0, -1]

    def _first(self, *args):
        start = time.perf_counter()
        with torch.inference_mode():
            out = self._step(*args)
        if not self._ready:
            self.compile_s, self._ready = time.perf_counter() - start, True
            logger.info("compiled the decode step in %.1f s", self.compile_s)
        return out
