"""`Engine`: add schemas (encode their modules once), then serve prompts by splicing.

A request goes: parse -> bind (markup.bind) -> splice stored states into a fresh per-request
cache (kv.cache) -> prefill only the new tokens at their positions -> decode. One engine serves
many threads: stored states are read-only, each request owns its cache, the store is locked.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence

import torch

from ..errors import PromptCacheError, PromptError
from ..kv.cache import empty_cache, splice
from ..kv.states import KVStates
from ..kv.store import ModuleStore
from ..markup.bind import bind
from ..markup.chat import ChatFormat, chat_format_for
from ..markup.layout import PromptPlan, SchemaLayout, compile_schema
from ..markup.nodes import Prompt, Schema
from ..markup.parse import is_pml, parse_prompt, parse_schema
from ..models.adapter import adapter_for
from .encode import encode_schema, prefill
from .generate import SamplingParams, TextTracker, decode_tokens, eos_ids
from .usage import Chunk, Completion, Usage

logger = logging.getLogger(__name__)


class Engine:
    """Serve prompts over any transformers causal LM, reusing precomputed module states.

    Args:
        model: a transformers causal LM (eval mode is set).
        tokenizer: its tokenizer.
        device: move the model there ("cpu", "cuda", ...); default: leave it where it is.
        chat_format: a builtin format name or a `ChatFormat`; default: derived from the tokenizer.
        device_budget_bytes / host_budget_bytes: module store budgets per tier (None: unbounded).
        ttl_s: drop stored module states idle for longer than this.
        progress: show a progress bar while encoding.
    """

    def __init__(self, model, tokenizer, *, device: str | torch.device | None = None,
                 chat_format: str | ChatFormat | None = None, device_budget_bytes: int | None = None,
                 host_budget_bytes: int | None = None, ttl_s: float | None = None, progress: bool = True):
        if device is not None:
            model = model.to(torch.device(device))
        self.model, self.tokenizer = model.eval(), tokenizer
        self.adapter = adapter_for(model)
        self.device = self.adapter.device
        self.chat = chat_format if isinstance(chat_format, ChatFormat) else \
            chat_format_for(tokenizer, model.config, chat_format)
        self.store = ModuleStore(self.device, device_budget_bytes, host_budget_bytes, ttl_s)
        self.schemas: dict[str, SchemaLayout] = {}
        self.progress = progress
        self.stop_ids = eos_ids(model, tokenizer)
        self._lock = threading.RLock()

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, device: str = "auto", dtype: str = "auto",
                        **kwargs) -> Engine:
        """Load a checkpoint (hub id or local path): GPU when present unless device="cpu"."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = "auto" if device != "cpu" else torch.float32
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype).to(device)
        return cls(model, tokenizer, **kwargs)

    # ---- schemas ---------------------------------------------------------------------------

    def add_schema(self, schema: str | os.PathLike | Schema, *, base_dir: str | os.PathLike | None = None,
                   ) -> SchemaLayout:
        """Parse and validate a schema (PML text, a path, or a `Schema`); encode its modules."""
        if not isinstance(schema, Schema):
            schema = parse_schema(schema, base_dir=base_dir)
        layout = compile_schema(schema, self.tokenizer, self.chat)
        if layout.length > self.adapter.max_positions:
            raise PromptError(f"schema '{layout.name}' is {layout.length} positions long; the model's "
                              f"context window is {self.adapter.max_positions}")
        with self._lock:
            for key in [k for k in self.store.keys() if k.startswith(layout.name + "\0")]:
                self.store.remove(key)
            self._encode(layout, None)
            self.schemas[layout.name] = layout
        return layout

    def _encode(self, layout: SchemaLayout, want: set[str] | None) -> int:
        states = encode_schema(self.adapter, layout, want, progress=self.progress)
        for path, st in states.items():
            self.store.put(self._key(layout.name, path), st)
        return sum(len(s) for s in states.values())

    @staticmethod
    def _key(schema: str, path: str) -> str:
        return f"{schema}\0{path}"

    def schema(self, name: str) -> SchemaLayout:
        try:
            return self.schemas[name]
        except KeyError:
            valid = ", ".join(sorted(self.schemas)) or "(none added yet: call add_schema first)"
            raise PromptError(f"unknown schema '{name}'; added schemas: {valid}") from None

    # ---- requests --------------------------------------------------------------------------

    def generate(self, prompt: str | Prompt, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, stop: str | Sequence[str] | None = None,
                 seed: int | None = None, enable_cache: bool = True, **kwargs) -> Completion:
        """Complete `prompt` (PML text or a `Prompt`). Extra kwargs: repetition_penalty,
        stop_token_ids, ignore_eos. Returns a `Completion` with text, token ids and usage."""
        result = None
        for item in self._run(prompt, enable_cache, self._params(max_new_tokens, temperature, top_p, top_k,
                                                                 stop, seed, **kwargs)):
            if isinstance(item, Completion):
                result = item
        return result

    def stream(self, prompt: str | Prompt, max_new_tokens: int = 256, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, stop: str | Sequence[str] | None = None,
               seed: int | None = None, enable_cache: bool = True, **kwargs) -> Iterator[Chunk]:
        """Like `generate`, yielding text deltas; the last chunk carries usage and finish_reason."""
        params = self._params(max_new_tokens, temperature, top_p, top_k, stop, seed, **kwargs)
        for item in self._run(prompt, enable_cache, params):
            if isinstance(item, Completion):
                yield Chunk("", item.usage, item.finish_reason)
            elif item:
                yield Chunk(item)

    def _params(self, max_new_tokens, temperature, top_p, top_k, stop, seed, **kwargs) -> SamplingParams:
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        unknown = set(kwargs) - {"repetition_penalty", "stop_token_ids", "ignore_eos"}
        if unknown:
            raise PromptError(f"unknown generation argument(s) {sorted(unknown)}; valid extras: "
                              "repetition_penalty, stop_token_ids, ignore_eos")
        if "stop_token_ids" in kwargs:
            kwargs["stop_token_ids"] = tuple(kwargs["stop_token_ids"] or ())
        return SamplingParams(max_new_tokens, temperature, top_p, top_k, stop=stops, seed=seed, **kwargs)

    def _plan(self, prompt: str | Prompt) -> tuple[PromptPlan, SchemaLayout]:
        if isinstance(prompt, str):
            if not is_pml(prompt):
                raise PromptError("prompt is not PML (expected <prompt schema=\"...\">...</prompt>)")
            prompt = parse_prompt(prompt)
        if not isinstance(prompt, Prompt):
            raise PromptError(f"prompt must be PML text or a Prompt, got {type(prompt).__name__}")
        layout = self.schema(prompt.schema)
        return bind(prompt, layout, self.tokenizer), layout

    def _run(self, prompt, enable_cache: bool, params: SamplingParams):
        t0 = time.perf_counter()
        plan, layout = self._plan(prompt)
        end = plan.next_position if enable_cache else len(plan.token_ids)
        room = self.adapter.max_positions - end
        if room <= 0:
            raise PromptError(f"prompt needs {end} positions; the model's context window is "
                              f"{self.adapter.max_positions}")
        capacity = len(plan.token_ids) + min(params.max_new_tokens, room)
        if enable_cache:
            cache, k_pos, n_past, logits, info = self._prefill_cached(plan, layout, capacity)
        else:
            cache, k_pos, n_past, logits, info = self._prefill_full(plan, capacity)
        yield from self._decode(plan, params, cache, k_pos, n_past, end, room, logits, info, t0)

    def _prefill_full(self, plan: PromptPlan, capacity: int):
        """The baseline: every prompt token, contiguous positions, one plain prefill."""
        dev = self.device
        kv_heads, head_dim = self.adapter.kv_geometry
        cache = empty_cache(self.adapter.num_layers, kv_heads, head_dim, capacity, dev, self.adapter.dtype)
        k_pos = torch.arange(capacity, dtype=torch.long, device=dev)
        n = len(plan.token_ids)
        ids = torch.tensor([plan.token_ids], dtype=torch.long, device=dev)
        logits = prefill(self.adapter, ids, k_pos[:n], cache, None)
        return cache, k_pos, n, logits[0, -1], (0, 0, (), ())

    def _prefill_cached(self, plan: PromptPlan, layout: SchemaLayout, capacity: int):
        parts, written, written_tokens = self._checkout(layout, plan.cached)
        new_ids, new_pos = list(plan.new_token_ids), list(plan.new_positions)
        # The prompt's last token must be computed: its logits start the answer.
        if parts and (not new_pos or max(new_pos) < int(parts[-1].positions[-1])):
            last = parts[-1]
            new_ids.append(last.token_ids[-1])
            new_pos.append(int(last.positions[-1]))
            parts[-1] = last.slice(0, len(last) - 1)
        parts = [p for p in parts if len(p)]
        dev = self.device
        if parts:
            cache, past = splice(parts, capacity, dev, self.adapter.dtype)
        else:
            kv_heads, head_dim = self.adapter.kv_geometry
            cache = empty_cache(self.adapter.num_layers, kv_heads, head_dim, capacity, dev, self.adapter.dtype)
            past = torch.empty(0, dtype=torch.long, device=dev)
        n_cached = len(past)
        k_pos = torch.empty(capacity, dtype=torch.long, device=dev)
        k_pos[:n_cached] = past
        q_pos = torch.tensor(new_pos, dtype=torch.long, device=dev)
        k_pos[n_cached:n_cached + len(new_pos)] = q_pos
        ids = torch.tensor([new_ids], dtype=torch.long, device=dev)
        logits = prefill(self.adapter, ids, q_pos, cache, past if n_cached else None)
        info = (n_cached, written_tokens, tuple(p for p in plan.cached if p not in written), written)
        return cache, k_pos, n_cached + len(new_pos), logits[0, -1], info

    def _checkout(self, layout: SchemaLayout, paths: Sequence[str]):
        """Stored states for `paths`, re-encoding any that were evicted."""
        found = {p: self.store.get(self._key(layout.name, p)) for p in paths}
        missing = {p for p, s in found.items() if s is None}
        written_tokens = 0
        if missing:
            logger.info("re-encoding evicted modules of %s: %s", layout.name, sorted(missing))
            fresh = encode_schema(self.adapter, layout, missing, progress=self.progress)
            for p, st in fresh.items():
                self.store.put(self._key(layout.name, p), st)
                found[p] = st
            written_tokens = sum(len(s) for s in fresh.values())
        return [found[p] for p in paths], tuple(sorted(missing)), written_tokens

    def _decode(self, plan, params, cache, k_pos, n, next_pos, room, logits, info, t0):
        n_cached, written_tokens, hit, written = info
        dev = self.device
        tracker = TextTracker(self.tokenizer, params.stop + plan.stop)
        stop_ids = set() if params.ignore_eos else set(self.stop_ids)
        stop_ids.update(params.stop_token_ids)
        state = {"n": n, "pos": next_pos}

        def step(token: int) -> torch.Tensor:
            i, p = state["n"], state["pos"]
            k_pos[i] = p
            ids = torch.tensor([[token]], dtype=torch.long, device=dev)
            out = self.adapter.forward(ids, k_pos[i:i + 1], k_pos[:i + 1], cache, logits_to_keep=1,
                                       in_order=True)
            state["n"], state["pos"] = i + 1, p + 1
            return out[0, -1]

        ttft, finish = None, "length"
        for token, reason in decode_tokens(step, logits, list(plan.token_ids), params, stop_ids, room, dev):
            if token is None:
                finish = reason
                break
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            tracker.add(token)
            if tracker.stopped:
                finish = "stop"
                break
            yield tracker.delta(final=False)
        yield tracker.delta(final=True)
        total = time.perf_counter() - t0
        usage = Usage(len(plan.token_ids), n_cached, written_tokens, len(tracker.ids), ttft or total, total,
                      hit, written)
        yield Completion(tracker.text, tuple(tracker.ids), usage, finish)
