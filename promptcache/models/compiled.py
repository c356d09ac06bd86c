"""Compiled steps for a few tokens: decoding (one token per call) and a short run of new tokens after
a cached context (a question after a cached prefix or module), `torch.compile`d as gpt-fast does.

Decoding a small model on a CPU, or running a short question over a cached context, is bound by
per-op dispatch and by the weights' memory traffic, not by arithmetic. Inductor with `freezing`
(weights become constants, prepacked) and `max_autotune` (its C++ GEMM micro-kernels, which read
bfloat16 weights about twice as fast as oneDNN's one-row matmul on AVX512-BF16) turns the whole
forward into a few fused kernels.
NOTE: measured on SmolLM2-135M, 2-core EPYC (2026-11-21): the generated code still calls the extern
`torch.mm` for the 211 matmuls of a token (85% of its time), and decoding is 1.09x eager bfloat16;
with `models.int8` (int8 weights for one-row steps) the matmuls are cheap and the compiled step is
1.6-1.9x eager int8 decoding (0.65-0.79x llama.cpp's tokens/s). A 14-token question after a cached
3k-token document: ~77 ms eager (bfloat16 + int8), ~57-61 ms compiled; without `max_autotune` the
several-token step compiles no faster and runs ~70 ms.

The request's cache block is only read inside the compiled graph. Writing the new tokens' keys and
values into it there would mutate 60 views of one tensor (every layer's keys and values), which
torch's functionalization turns into copies of the whole block (seconds per token). Instead:

    block (read-only)   [ slots 0 .. fed-1 ][ fed ... capacity ]      per layer: keys, values
    the n new tokens    attend to slots < fed, to themselves and to the new tokens before them
                        (`block_attention`)
    graph outputs       the last token's logits, and the new keys/values of every layer [2, layers, 1, kv, n, d]
    after the graph     one copy into slots fed..fed+n-1 of the block (eager), layer lengths + n

The one-token step's shapes are static but the block's capacity, which is marked dynamic; the
several-token step marks the token count dynamic too: one compilation of each serves every request
(the first call compiles, one to two minutes each on a small CPU; later processes reuse inductor's
on-disk cache). Concurrent requests call the same compiled steps with their own blocks; a first
call compiles under a lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)

BLOCK = "promptcache_block"  # model kwargs that reach the attention function (see `block_attention`)
FED = "promptcache_fed"
SINK = "promptcache_sink"
INDUCTOR_OPTIONS = {"freezing": True, "max_autotune": True}
FEW_TOKENS = 32  # the most tokens the several-token step takes (a short question after a cached context)
MIN_FEW = 3  # the fewest it takes: two-token calls stay eager (int8 weights serve 1-2 rows, `models.int8`,
# a branch a token count from 2 up would have to guard on)


def block_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None,
                    block: torch.Tensor, fed: torch.Tensor, sink: list) -> torch.Tensor:
    """n queries over the first `fed` slots of `block` (this layer's) and their own keys; [b, n, heads, d].

    query: [b, heads, n, d]; key, value: [b, kv_heads, n, d] (the new tokens', already rotated), in
    position order after every filled slot: each query sees every filled slot, itself and the new
    tokens before it. block: [2, layers, b, kv_heads, capacity, d]. The new keys/values are appended
    to `sink`.
    """
    b, heads, n, d = query.shape
    groups = key.shape[1]
    q = query.reshape(b, groups, heads // groups * n, d)  # rows: (head in group, token)
    scale = d ** -0.5 if scaling is None else scaling
    past_k, past_v = block[0, module.layer_idx], block[1, module.layer_idx]  # [b, kv_heads, capacity, d]
    capacity = past_k.shape[2]
    past = torch.matmul(q, past_k.transpose(-1, -2)) * scale  # [b, kv_heads, group * n, capacity]
    past = past.masked_fill((torch.arange(capacity, device=q.device) >= fed).view(1, 1, 1, capacity), float("-inf"))
    own = torch.matmul(q, key.transpose(-1, -2)) * scale  # [b, kv_heads, group * n, n]
    if n > 1:
        token = torch.arange(n, device=q.device)
        later = (token.view(1, n) > token.view(n, 1)).repeat(heads // groups, 1)  # [group * n, n]: key after query
        own = own.masked_fill(later, float("-inf"))
    probs = torch.softmax(torch.cat([past, own], dim=-1), dim=-1, dtype=torch.float32).to(value.dtype)
    mine = torch.matmul(probs[..., capacity:], value) if n > 1 else probs[..., capacity:] * value
    out = torch.matmul(probs[..., :capacity], past_v) + mine
    sink.append((key, value))
    return out.view(b, heads, n, value.shape[-1]).transpose(1, 2)


def plain_kernel_forwards(model) -> int:
    """Make the modules of `model` that `kernels.use_kernelized_func` wrapped (transformers >= 5.25 wraps
    Llama's attention, ...) call their plain forward; the number of modules changed.

    The wrapper routes calls to hub kernels through one `CompileableContextVar`; while any thread runs
    compiled code, kernels 0.19 switches that variable to a process-wide global, and an eager forward in
    another thread then restores its own context token into the global (a request failed with
    "'_contextvars.Token' object has no attribute 'get'", and every later call of every model in the
    process with it). Without hub kernels (never loaded unless the model was `kernelize`d) the wrapper
    calls the plain function anyway. Kernelized models are left as they are. Instance attributes only:
    other models of the class in the process keep the wrapper.
    """
    changed = 0
    for module in model.modules():
        wrapped = getattr(type(module).forward, "__wrapped__", None)
        funcs = module.__dict__.get("_kernel_funcs")
        if wrapped is None or funcs is None or "forward" in module.__dict__:
            continue
        if any("forward" in f.__dict__ for f in funcs.values()):
            continue  # kernelized: `kernels.kernelize` gave a function a hub kernel's forward
        module.forward = wrapped.__get__(module)
        changed += 1
    return changed


class CompiledDecode:
    """The compiled forward of a few tokens of a model whose attention is `adapter.ATTENTION`.

    Two compiled steps: one token (decoding; every shape static but the block's capacity) and
    `MIN_FEW`..`FEW_TOKENS` tokens in position order after the cache (a question after a cached prefix or
    module; the token count is dynamic too, so one compilation serves every count). Each compiles on
    its first call.

    Args:
        model: the transformers causal LM (its attention must dispatch through the AttentionInterface).
        options: inductor options (default `INDUCTOR_OPTIONS`).
        backend: `torch.compile`'s backend ("eager" traces the graph without generating code: tests).
    """

    def __init__(self, model, options: dict | None = None, backend: str = "inductor"):
        self.model = model
        unhooked = plain_kernel_forwards(model)
        if unhooked:
            logger.debug("compiled decode: %d modules call their plain forward (no hub-kernel routing)", unhooked)
        self.options = dict(INDUCTOR_OPTIONS if options is None else options)
        inductor = self.options if backend == "inductor" else {}
        # NOTE: no guards on the model's modules (~1.6 ms per call on SmolLM2's 30 layers, 8% of a decoded
        # token): `freezing` makes the weights constants of the graph, so a model changed after
        # compiling is not seen either way. Each compiled step keeps its own cache entries
        # (`isolate_recompiles`), so that no guard is needed to tell one engine's model from another's
        # (two engines on two tiny models, compiled in one process, each gave its own eager tokens with
        # and without this, and without any guard: defensive).
        inductor["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
        # NOTE: two wrappers, two dynamo caches: the one-token graph never sees a dynamic token count.
        self._steps = {1: torch.compile(self._one, backend=backend, options=inductor, isolate_recompiles=True),
                       FEW_TOKENS: torch.compile(self._few, backend=backend, options=inductor,
                                                 isolate_recompiles=True)}
        self._lock = threading.Lock()
        self._ready: set[int] = set()
        self.compile_s: float | None = None  # seconds the first one-token call took (compilation included)
        self.compile_few_s: float | None = None  # the same for the first call with several tokens

    def _one(self, ids, pos, block, fed):
        return self._forward(ids, pos, block, fed)

    def _few(self, ids, pos, block, fed):
        return self._forward(ids, pos, block, fed)

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, block: torch.Tensor, fed: torch.Tensor):
        sink: list = []
        logits = self.model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=1,
                            **{BLOCK: block, FED: fed, SINK: sink}).logits
        keys = torch.stack([k for k, _ in sink])
        values = torch.stack([v for _, v in sink])
        return logits, torch.stack([keys, values])  # [2, layers, b, kv_heads, n, d]

    def __call__(self, token: int, position: int, cache, fed: int) -> torch.Tensor:
        """Logits [vocab] of `token` at `position` after the first `fed` slots of `cache` (a
        `kv.cache.RequestCache`), whose slot `fed` and layer lengths it then fills."""
        return self.forward([token], [position], cache, fed)

    def forward(self, tokens: Sequence[int], positions: Sequence[int], cache, fed: int) -> torch.Tensor:
        """Logits [vocab] of the last of `tokens` (1 or `MIN_FEW`..`FEW_TOKENS`, at increasing `positions`, each
        after every filled slot) after the first `fed` slots of `cache`, whose next slots and layer
        lengths it then fills."""
        n = len(tokens)
        assert n == 1 or MIN_FEW <= n <= FEW_TOKENS, f"{n} tokens: the compiled steps take 1 or {MIN_FEW}..{FEW_TOKENS}"
        block = cache.block
        device = block.device
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=device)
        pos = torch.tensor([list(positions)], dtype=torch.long, device=device)
        torch._dynamo.mark_dynamic(block, 4)
        key = 1 if n == 1 else FEW_TOKENS
        if key != 1:
            torch._dynamo.mark_dynamic(ids, 1, min=MIN_FEW, max=FEW_TOKENS)
            torch._dynamo.mark_dynamic(pos, 1, min=MIN_FEW, max=FEW_TOKENS)
        args = (ids, pos, block, torch.tensor(fed, dtype=torch.long, device=device))
        if key not in self._ready:
            with self._lock:
                logits, new = self._first(key, *args)
        else:
            with torch.inference_mode():
                logits, new = self._steps[key](*args)
        cache.fill_to(fed)
        cache.append(new)
        return logits[0, -1]

    def _first(self, key: int, *args):
        start = time.perf_counter()
        with torch.inference_mode():
            out = self._steps[key](*args)
        if key not in self._ready:
            seconds = time.perf_counter() - start
            if key == 1:
                self.compile_s = seconds
            else:
                self.compile_few_s = seconds
            self._ready.add(key)
            logger.info("compiled the %s step in %.1f s", "one-token" if key == 1 else "few-token", seconds)
        return out
