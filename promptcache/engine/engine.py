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

from ..errors import PromptError
from ..kv.cache import empty_cache, splice
from ..kv.disk import DiskStore, states_key
from ..kv.pool import BufferPool
from ..kv.prefix import PrefixTree
from ..kv.states import KVStates
from ..kv.store import ModuleStore
from ..markup.bind import bind
from ..markup.chat import ChatFormat, chat_format_for
from ..markup.layout import PromptPlan, SchemaLayout, compile_schema, leading_bos
from ..markup.nodes import Prompt, Schema
from ..markup.parse import is_pml, parse_prompt, parse_schema
from ..models.adapter import adapter_for
from ..response_cache import ResponseCache, is_deterministic, request_key
from .encode import encode_schema, prefill
from .generate import SamplingParams, TextTracker, decode_tokens, eos_ids
from .identity import engine_identity, module_contexts
from .plain import plain_plan
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
        ttl_s: drop stored module states (and cached prefixes) idle for longer than this.
        store_dir: persist module states there (safetensors), keyed by everything they depend on.
        response_cache_dir: answer identical deterministic requests from disk (off by default).
        prefix_cache: reuse the longest previously computed prefix of plain prompts and chats.
        prefix_budget_bytes: bytes of prefix states kept (None: unbounded), LRU leaves first.
        pool_blocks: idle request caches kept for the next requests (None: 4 on the CPU, where a
            fresh one page-faults; 0 elsewhere, where torch's caching allocator reuses memory).
        progress: show a progress bar while encoding.
    """

    def __init__(self, model, tokenizer, *, device: str | torch.device | None = None,
                 chat_format: str | ChatFormat | None = None, device_budget_bytes: int | None = None,
                 host_budget_bytes: int | None = None, ttl_s: float | None = None,
                 store_dir: str | os.PathLike | None = None, response_cache_dir: str | os.PathLike | None = None,
                 prefix_cache: bool = True, prefix_budget_bytes: int | None = None, pool_blocks: int | None = None,
                 progress: bool = True):
        if device is not None:
            model = model.to(torch.device(device))
        self.model, self.tokenizer = model.eval(), tokenizer
        self.adapter = adapter_for(model)
        self.device = self.adapter.device
        self.chat_format = chat_format if isinstance(chat_format, ChatFormat) else \
            chat_format_for(tokenizer, model.config, chat_format)
        if pool_blocks is None:
            pool_blocks = 4 if self.device.type == "cpu" else 0
        self.pool = BufferPool(pool_blocks)
        self.store = ModuleStore(self.device, device_budget_bytes, host_budget_bytes, ttl_s)
        self.schemas: dict[str, SchemaLayout] = {}
        self.progress = progress
        self.stop_ids = eos_ids(model, tokenizer)
        self._bos = leading_bos(tokenizer)  # prepended to plain prompts and chats
        self._lock = threading.RLock()
        self.prefix = PrefixTree(prefix_budget_bytes, ttl_s) if prefix_cache else None
        self.disk = DiskStore(store_dir) if store_dir is not None else None
        self.responses = ResponseCache(response_cache_dir, ttl_s) if response_cache_dir is not None else None
        self._identity = None
        self._disk_keys: dict[str, str] = {}

    @property
    def identity(self) -> dict[str, str]:
        """Model, weights, config, tokenizer, dtype and chat format, hashed (computed once)."""
        if self._identity is None:
            self._identity = engine_identity(self.model, self.tokenizer, self.adapter.dtype, self.chat_format)
        return self._identity

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
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise PromptError(f"unknown dtype '{dtype}'; valid: auto, float32, float16, bfloat16")
            dtype = getattr(torch, dtype)
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype).to(device)
        except OSError as e:  # a wrong path or hub id, no network, a checkpoint missing its files
            raise PromptError(f"cannot load model '{name_or_path}': expected a local checkpoint directory "
                              f"or a downloadable hub id ({e})") from e
        return cls(model, tokenizer, **kwargs)

    # ---- schemas ---------------------------------------------------------------------------

    def add_schema(self, schema: str | os.PathLike | Schema, *, base_dir: str | os.PathLike | None = None,
                   ) -> SchemaLayout:
        """Parse and validate a schema (PML text, a path, or a `Schema`); encode its modules."""
        if not isinstance(schema, Schema):
            schema = parse_schema(schema, base_dir=base_dir)
        layout = compile_schema(schema, self.tokenizer, self.chat_format)
        if layout.length > self.adapter.max_positions:
            raise PromptError(f"schema '{layout.name}' is {layout.length} positions long; the model's "
                              f"context window is {self.adapter.max_positions}")
        with self._lock:
            for key in [k for k in self.store.keys() if k.startswith(layout.name + "\0")]:
                self.store.remove(key)
            if self.disk is not None:
                contexts = module_contexts(layout)
                for path, ctx in contexts.items():
                    self._disk_keys[self._key(layout.name, path)] = states_key(**self.identity, context=ctx)
            cacheable = {p for p, m in layout.modules.items() if m.cache and m.token_ids}
            missing = cacheable - set(self._load(layout, cacheable))
            if missing:
                self._encode(layout, None if missing == cacheable else missing)
            self.schemas[layout.name] = layout
        return layout

    def _load(self, layout: SchemaLayout, paths: set[str]) -> dict[str, KVStates]:
        """States of `paths` found in the disk store (also put in the module store)."""
        found = {}
        for path in paths if self.disk is not None else ():
            states = self.disk.load(self._disk_keys[self._key(layout.name, path)], device=self.device)
            if states is not None:
                # NOTE: returned directly; a small budget may evict it from the store right away.
                self.store.put(self._key(layout.name, path), states)
                found[path] = states
        if found:
            logger.info("loaded %d modules of %s from %s", len(found), layout.name, self.disk.root)
        return found

    def _encode(self, layout: SchemaLayout, want: set[str] | None) -> dict[str, KVStates]:
        states = encode_schema(self.adapter, layout, want, progress=self.progress)
        for path, st in states.items():
            key = self._key(layout.name, path)
            self.store.put(key, st)
            if self.disk is not None:
                self.disk.save(self._disk_keys[key], st, {"schema": layout.name, "module": path})
        return states

    def pin(self, schema: str, module: str = "") -> None:
        """Keep a module's states in their memory tier: never demoted or dropped."""
        layout = self.schema(schema)
        if module not in layout.modules or not layout.modules[module].cache:
            valid = ", ".join(p for p, m in layout.modules.items() if m.cache and p) or "(none)"
            raise PromptError(f"schema '{schema}' has no cached module '{module}'; cached modules: {valid}")
        with self._lock:
            if self._key(schema, module) not in self.store:
                self._checkout(layout, [module])
            self.store.pin(self._key(schema, module))

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

    def generate(self, prompt: str | Prompt | Sequence[dict], max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 stop: str | Sequence[str] | None = None, seed: int | None = None, enable_cache: bool = True,
                 namespace: str = "", **kwargs) -> Completion:
        """Complete a prompt: PML text or a `Prompt` (module splicing), plain text, or chat messages
        `[{"role", "content"}]` (automatic prefix reuse). Extra kwargs: repetition_penalty,
        stop_token_ids, ignore_eos. `namespace` keeps one tenant's prefixes from another's."""
        params = self._params(max_new_tokens, temperature, top_p, top_k, stop, seed, **kwargs)
        return [x for x in self._run(prompt, enable_cache, params, namespace) if isinstance(x, Completion)][0]

    def stream(self, prompt: str | Prompt | Sequence[dict], max_new_tokens: int = 256,
               temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
               stop: str | Sequence[str] | None = None, seed: int | None = None, enable_cache: bool = True,
               namespace: str = "", **kwargs) -> Iterator[Chunk]:
        """Like `generate`, yielding text deltas; the last chunk carries usage and finish_reason."""
        params = self._params(max_new_tokens, temperature, top_p, top_k, stop, seed, **kwargs)
        for item in self._run(prompt, enable_cache, params, namespace):
            if isinstance(item, Completion):
                yield Chunk("", item.usage, item.finish_reason)
            elif item:
                yield Chunk(item)

    def chat(self, system: str | None = None, namespace: str = ""):
        """A multi-turn `Conversation`; each turn reuses every earlier turn's states."""
        from .conversation import Conversation

        return Conversation(self, system, namespace)

    def _params(self, max_new_tokens, temperature, top_p, top_k, stop, seed, **kwargs) -> SamplingParams:
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        unknown = set(kwargs) - {"repetition_penalty", "stop_token_ids", "ignore_eos"}
        if unknown:
            raise PromptError(f"unknown generation argument(s) {sorted(unknown)}; valid extras: "
                              "repetition_penalty, stop_token_ids, ignore_eos")
        if "stop_token_ids" in kwargs:
            kwargs["stop_token_ids"] = tuple(kwargs["stop_token_ids"] or ())
        return SamplingParams(max_new_tokens, temperature, top_p, top_k, stop=stops, seed=seed, **kwargs)

    def _plan(self, prompt) -> tuple[PromptPlan, SchemaLayout | None]:
        """Bind a PML prompt to its schema, or tokenize a plain prompt / chat (layout None)."""
        if isinstance(prompt, str) and is_pml(prompt):
            prompt = parse_prompt(prompt)
        if isinstance(prompt, Prompt):
            layout = self.schema(prompt.schema)
            return bind(prompt, layout, self.tokenizer), layout
        if isinstance(prompt, str) or (isinstance(prompt, Sequence) and not isinstance(prompt, bytes)):
            return plain_plan(prompt, self.tokenizer, self.chat_format, self._bos), None
        raise PromptError(f"prompt must be PML text, a Prompt, plain text or a list of chat messages, "
                          f"got {type(prompt).__name__}")

    def _run(self, prompt, enable_cache: bool, params: SamplingParams, namespace: str):
        t0 = time.perf_counter()
        if not isinstance(namespace, str):
            raise PromptError(f"namespace must be a string, got {type(namespace).__name__}")
        plan, layout = self._plan(prompt)
        rkey = self._response_key(prompt, params, enable_cache, namespace)
        if rkey is not None and (hit := self.responses.get(rkey)) is not None:
            yield hit["text"]
            total = time.perf_counter() - t0
            u = hit["usage"]
            yield Completion(hit["text"], tuple(hit["token_ids"]), Usage(
                u["input_tokens"], u["input_tokens"], 0, u["output_tokens"], total, total, response_cached=True),
                hit["finish_reason"])
            return
        end = plan.next_position if enable_cache else len(plan.token_ids)
        room = self.adapter.max_positions - end
        if room <= 0:
            raise PromptError(f"prompt needs {end} positions; the model's context window is "
                              f"{self.adapter.max_positions}")
        capacity = len(plan.token_ids) + min(params.max_new_tokens, room)
        if not enable_cache:
            req = self._prefill_full(plan, capacity)
        elif layout is None:
            req = self._prefill_prefix(plan, capacity, namespace) if self.prefix else self._prefill_full(plan, capacity)
        else:
            req = self._prefill_cached(plan, layout, capacity)
        cache, k_pos, n, logits, (n_cached, writes, hit, written) = req
        try:
            tracker, finish, ttft, n_fed = yield from self._decode(plan, params, cache, k_pos, n, end, room,
                                                                   logits, t0)
            if enable_cache and layout is None and self.prefix is not None:
                ids = list(plan.token_ids) + tracker.ids[: n_fed - len(plan.token_ids)]
                states = KVStates(tuple(ids), k_pos[:n_fed], tuple(la.keys[:, :, :n_fed] for la in cache.layers),
                                  tuple(la.values[:, :, :n_fed] for la in cache.layers))
                stored = self.prefix.insert(ids, states, namespace)  # copies: the block is reused
                # usage counts prompt tokens only; generated tokens are stored too, for the next chat turn
                writes += max(0, stored - (len(ids) - len(plan.token_ids)))
        finally:
            self.pool.give(cache.block)  # also when a stream is abandoned: nothing reads the cache after
        total = time.perf_counter() - t0
        usage = Usage(len(plan.token_ids), n_cached, writes, len(tracker.ids), ttft or total, total, hit, written)
        out = Completion(tracker.text, tuple(tracker.ids), usage, finish)
        if rkey is not None:
            self.responses.put(rkey, {"text": out.text, "token_ids": list(out.token_ids),
                                      "finish_reason": finish, "usage": usage.to_dict()})
        yield out

    def _response_key(self, prompt, params: SamplingParams, enable_cache: bool, namespace: str) -> str | None:
        if self.responses is None or not is_deterministic(vars(params)):
            return None
        if isinstance(prompt, Prompt):
            from ..markup.builder import prompt_to_xml

            prompt = prompt_to_xml(prompt)
        text = prompt if isinstance(prompt, str) else [dict(m) for m in prompt]
        settings = {**vars(params), "stop": list(params.stop), "stop_token_ids": list(params.stop_token_ids),
                    "enable_cache": enable_cache}
        return request_key(model_id=self.identity["weights"] + self.identity["config"], prompt=text,
                           params=settings, namespace=namespace)

    def _new_cache(self, capacity: int):
        kv_heads, head_dim = self.adapter.kv_geometry
        return empty_cache(self.adapter.num_layers, kv_heads, head_dim, capacity, self.device, self.adapter.dtype,
                           pool=self.pool)

    def _prefill_full(self, plan: PromptPlan, capacity: int):
        """The baseline: every prompt token, contiguous positions, one plain prefill."""
        cache = self._new_cache(capacity)
        k_pos = torch.arange(capacity, dtype=torch.long, device=self.device)
        n = len(plan.token_ids)
        ids = torch.tensor([plan.token_ids], dtype=torch.long, device=self.device)
        logits = prefill(self.adapter, ids, k_pos[:n], cache, None)
        return cache, k_pos, n, logits[0, -1], (0, 0, (), ())

    def _prefill_prefix(self, plan: PromptPlan, capacity: int, namespace: str):
        """Plain prompts and chats: splice the longest cached prefix, compute the rest."""
        ids = plan.token_ids
        with self.prefix.match(ids, namespace) as match:
            use = min(match.length, len(ids) - 1)  # the last token is computed: its logits start the answer
            parts, left = [], use
            for st in match.states:
                if left > 0:
                    parts.append(st.slice(0, min(left, len(st))))
                    left -= len(parts[-1])
            if parts:
                cache, _ = splice(parts, capacity, self.device, self.adapter.dtype, pool=self.pool)
        if not parts:
            cache = self._new_cache(capacity)
        k_pos = torch.arange(capacity, dtype=torch.long, device=self.device)
        new = torch.tensor([ids[use:]], dtype=torch.long, device=self.device)
        logits = prefill(self.adapter, new, k_pos[use:len(ids)], cache, k_pos[:use] if use else None)
        return cache, k_pos, len(ids), logits[0, -1], (use, 0, (), ())

    def _prefill_cached(self, plan: PromptPlan, layout: SchemaLayout, capacity: int):
        """PML prompts: splice the selected modules' states, compute the new tokens at their positions."""
        parts, written, written_tokens = self._checkout(layout, plan.cached)
        new_ids, new_pos = list(plan.new_token_ids), list(plan.new_positions)
        # The prompt's last token (highest position) must be computed: its logits start the answer.
        # It may sit in any part (the root's text can follow a module), so split that part around it.
        tops = [int(p.positions.max()) if len(p) else -1 for p in parts]
        if parts and (not new_pos or max(new_pos) < max(tops)):
            i = tops.index(max(tops))
            j = int(parts[i].positions.argmax())
            new_ids.append(parts[i].token_ids[j])
            new_pos.append(tops[i])
            parts[i:i + 1] = [parts[i].slice(0, j), parts[i].slice(j + 1, len(parts[i]))]
        parts = [p for p in parts if len(p)]
        dev = self.device
        if parts:
            cache, past = splice(parts, capacity, dev, self.adapter.dtype, pool=self.pool)
        else:
            cache, past = self._new_cache(capacity), torch.empty(0, dtype=torch.long, device=dev)
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
        """Stored states for `paths`: from memory, else the disk store, else re-encoded."""
        found = {p: self.store.get(self._key(layout.name, p)) for p in paths}
        missing = {p for p, s in found.items() if s is None}
        written_tokens = 0
        if missing:
            found.update(self._load(layout, missing))
            missing = {p for p, s in found.items() if s is None}
        if missing:
            logger.info("re-encoding evicted modules of %s: %s", layout.name, sorted(missing))
            fresh = self._encode(layout, missing)
            found.update(fresh)
            written_tokens = sum(len(s) for s in fresh.values())
        return [found[p] for p in paths], tuple(sorted(missing)), written_tokens

    def _decode(self, plan, params, cache, k_pos, n, next_pos, room, logits, t0: float):
        """Yield text deltas; return (tracker, finish_reason, ttft, tokens fed through the model)."""
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
        return tracker, finish, ttft, state["n"]
