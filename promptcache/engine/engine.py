"""`Engine`: add schemas (encode their modules once), then serve prompts by splicing.

A request is three named steps (`generate`/`stream` run them; tests and tools may run them too):

    plan = engine.plan(prompt)                  # bind PML to a schema version, or tokenize; no model work
    with engine.prefill(plan, max_new_tokens) as pre:   # splice cached states, compute the new tokens
        decoder = engine.decoder(plan, pre, params)     # positions, sampling, stops, budget
        while (token := decoder.step()) is not None: ...

One engine serves many threads: stored states are read-only, each request owns its cache, the
module registry and the prefix tree lock themselves.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Iterator, Sequence

import torch

from ..embeddings import Embedder
from ..errors import PromptError
from ..kv.cache import RequestCache, request_cache
from ..kv.disk import DiskStore
from ..kv.pool import BufferPool
from ..kv.prefix import DEFAULT_PREFIX_BUDGET_BYTES, PrefixMatch, PrefixTree
from ..kv.states import KVStates
from ..kv.store import ModuleStore
from ..kv.warm import Reuse, contents_of
from ..markup.bind import bind
from ..markup.chat import ChatFormat, chat_format_for
from ..markup.check import check_prompt
from ..markup.layout import SchemaLayout, leading_bos
from ..markup.nodes import Prompt, Schema
from ..markup.parse import is_pml, parse_prompt
from ..models.adapter import adapter_for
from ..models.load import resolve_device
from ..response_cache import ResponseCache
from ..response_match import DEFAULT_EMBEDDER, ResponseKey, ResponseReuse, check_match
from . import checks
from .answers import AnswerMemory
from .budget import DEFAULT_KV_BUDGET_BYTES, DEFAULT_MAX_BATCH, DEFAULT_PREFILL_CHUNK, ModuleBudget
from .decoder import Decoder
from .generate import SamplingParams, eos_ids
from .identity import FINGERPRINTS, engine_identity
from .keep import Breakpoint, Kept, PrefixKeeper, breakpoint_offsets
from .modules import ModuleRegistry, SchemaAdded
from .plain import plain_plan
from .prefill import CacheSpec, Prefill, prefill_full, prefill_modules, prefill_prefix
from .recompute import DEFAULT_RECOMPUTE, Recompute, plan_blend, recompute_policy, recomputes_all
from .request import RequestPlan, make_plan
from .retrieval import DEFAULT_RETRIEVED_RECOMPUTE, Embedding, ModuleIndex, retrieve_modules, with_retrieved
from .scheduler import Scheduler
from .usage import Chunk, Completion, Usage

logger = logging.getLogger(__name__)

INITIAL_ROOM = 64  # generated tokens a request cache has room for before it first grows (`kv.cache`)
WARM_UP_PROMPT = "Hello, how are you today?"  # several tokens with any tokenizer (`Engine.warm_up`)


class Engine:
    """Serve prompts over any transformers causal LM, reusing precomputed module states.

    Args:
        model: a transformers causal LM (eval mode is set).
        tokenizer: its tokenizer.
        device: move the model there ("cpu", "cuda", ...); default: leave it where it is.
        chat_format: a builtin format name or a `ChatFormat`; default: derived from the tokenizer.
        device_budget_bytes / host_budget_bytes: module store budgets per tier (None: unbounded).
        module_budget_bytes: the most bytes of module states the added schemas may need together; a schema
            that would pass it is refused (`engine.budget`; None: unbounded).
        ttl_s: drop stored module states (and cached prefixes) idle for longer than this.
        store_dir: persist module states there (safetensors), keyed by everything they depend on.
        response_cache_dir: answer identical deterministic requests from disk (off by default).
        response_match: what "identical" means there: "exact" token ids (default), "normalized" text, or
            "semantic" (normalized, else the nearest cached request by meaning within `semantic_threshold`,
            all else equal); see `promptcache.response_match`.
        semantic_threshold: the least cosine similarity of a semantic match (None: the embedder's default,
            the lowest with no wrong reuse on the shipped labelled set).
        embedder: the sentence embedder of semantic matches and `retrieve`: "use-multilingual" (default),
            "minilm", a checkpoint directory or a `promptcache.embeddings.Embedder`; loaded when first needed.
        retrieved_recompute: `recompute` for PML prompts with `retrieve="k"` (default 1.0: their modules'
            states were encoded after documents the prompt skips; benchmarks/README.md, "Retrieved
            documents"). A request's own `recompute` overrides it.
        prefix_cache: reuse the longest previously computed prefix of plain prompts and chats; also keeps
            the states of PML prompts whose stale states were all recomputed (`recompute=1.0`), so that the
            next such request of the same text computes only what follows them.
        prefix_budget_bytes: bytes of prefix states kept, least recently used leaves dropped first
            (default `kv.prefix.DEFAULT_PREFIX_BUDGET_BYTES`, 1 GiB; None: unbounded).
        pool_blocks: idle request caches kept for the next requests (None: 4 on the CPU, where a
            fresh one page-faults; 0 elsewhere, where torch's caching allocator reuses memory).
        fingerprint: how the weights are hashed into store keys: "full" (every byte, once per
            engine) or "sampled" (a strided sample; faster on big models, but see
            `identity.weights_fingerprint`).
        progress: show a progress bar while encoding.
        recompute: for PML prompts whose spliced states are stale (skipped modules, another union
            member, arguments), the fraction of spliced tokens to recompute, 0..1 (a float, or a
            `recompute.Recompute`); 0 splices them as stored. A request may override it.
        compile_decode: decode through a `torch.compile`d one-token step, and run 3-32 new tokens after
            a cached context (a question after a cached prefix or module, a short prompt) through a
            compiled several-token step (`models.compiled`); each compiles on its first call (30-120 s
            on a 2-core CPU). With `int8_decode` 1.6-1.9x the tokens/s of eager int8 decoding on
            SmolLM2-135M; alone 1.09x, where bfloat16's one-row matmuls dominate. Cached time to first
            token: README, "Performance against llama.cpp".
            Llama, Mistral, Qwen2 and other models whose attention goes through transformers'
            AttentionInterface.
        int8_decode: one- and two-token steps (decoding) read int8 copies of the linear weights
            (`models.int8`; CPU, bfloat16 models): several times faster per weight than bfloat16's
            one-row matmul, at +50% weight memory and per-channel int8 error in decoded tokens.
            Converts the model's `nn.Linear` layers in place.
        max_batch / kv_budget_bytes / prefill_chunk: continuous batching (`engine.scheduler`):
            `generate` and `stream` calls from any number of threads run as one batch of at most
            `max_batch` requests, whose decode steps share one forward; running requests reserve at
            most `kv_budget_bytes` of request cache in all (a request that would need more waits, one
            that never fits is refused); while requests decode, a prefill runs `prefill_chunk` prompt
            tokens per step.
    """

    def __init__(self, model, tokenizer, *, device: str | torch.device | None = None,
                 chat_format: str | ChatFormat | None = None, device_budget_bytes: int | None = None,
                 host_budget_bytes: int | None = None, ttl_s: float | None = None,
                 store_dir: str | os.PathLike | None = None, response_cache_dir: str | os.PathLike | None = None,
                 prefix_cache: bool = True, prefix_budget_bytes: int | None = DEFAULT_PREFIX_BUDGET_BYTES,
                 pool_blocks: int | None = None, fingerprint: str = "full", progress: bool = True,
                 recompute: float | Recompute = DEFAULT_RECOMPUTE, param_filler: str = " ",
                 pad_arguments: bool = True, compile_decode: bool = False, int8_decode: bool = False,
                 module_budget_bytes: int | None = None, response_match: str = "exact",
                 semantic_threshold: float | None = None, embedder: str | Embedder = DEFAULT_EMBEDDER,
                 retrieved_recompute: float | Recompute = DEFAULT_RETRIEVED_RECOMPUTE,
                 max_batch: int = DEFAULT_MAX_BATCH, kv_budget_bytes: int = DEFAULT_KV_BUDGET_BYTES,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK):
        ttl_s = checks.optional_seconds("ttl_s", ttl_s)
        prefix_budget_bytes = checks.optional_count("prefix_budget_bytes", prefix_budget_bytes)
        pool_blocks = checks.optional_count("pool_blocks", pool_blocks)
        module_budget_bytes = checks.optional_count("module_budget_bytes", module_budget_bytes)
        store_dir = checks.optional_dir("store_dir", store_dir)
        response_cache_dir = checks.optional_dir("response_cache_dir", response_cache_dir)
        check_match(response_match, response_cache_dir)
        checks.flag("prefix_cache", prefix_cache)
        checks.flag("progress", progress)
        if fingerprint not in FINGERPRINTS:
            raise PromptError(f"invalid fingerprint={fingerprint!r:.80}: must be one of {', '.join(FINGERPRINTS)}")
        self.fingerprint = fingerprint
        self.recompute = recompute_policy(recompute)  # None: splice stale states as stored
        self.retrieved_recompute = recompute_policy(retrieved_recompute)
        if device is not None:
            model = model.to(resolve_device(device))
        self.model, self.tokenizer = model.eval(), tokenizer
        self.int8_decode = checks.flag("int8_decode", int8_decode)
        if self.int8_decode:
            from ..models.int8 import int8_decode as convert_int8

            convert_int8(model)
        self.adapter = adapter_for(model)
        if checks.flag("compile_decode", compile_decode):
            self.adapter.compile_decode()
        self.device = self.adapter.device
        self.chat_format = chat_format if isinstance(chat_format, ChatFormat) else \
            chat_format_for(tokenizer, model.config, chat_format)
        if pool_blocks is None:
            pool_blocks = 4 if self.device.type == "cpu" else 0
        self.pool = BufferPool(pool_blocks)
        self.store = ModuleStore(self.device, device_budget_bytes, host_budget_bytes, ttl_s)
        self.disk = DiskStore(store_dir) if store_dir is not None else None
        self.modules = ModuleRegistry(self.adapter, tokenizer, self.chat_format, self.store, self.disk,
                                      lambda: self.identity, progress)
        if not isinstance(param_filler, str) or not param_filler:
            raise PromptError(f"invalid param_filler={param_filler!r:.80}: must be non-empty text")
        self.modules.param_filler = param_filler
        self.modules.budget = ModuleBudget(module_budget_bytes, self.adapter)
        self.pad_arguments = checks.flag("pad_arguments", pad_arguments)
        self.stop_ids = eos_ids(model, tokenizer)
        self._bos = leading_bos(tokenizer)  # prepended to plain prompts and chats
        self.prefix = PrefixTree(prefix_budget_bytes, ttl_s) if prefix_cache else None
        self.keeper = PrefixKeeper(self.prefix) if self.prefix is not None else None
        self.responses = ResponseCache(response_cache_dir, ttl_s) if response_cache_dir is not None else None
        self.embedding = Embedding(embedder)
        self.reuse = ResponseReuse(self.responses, response_match, semantic_threshold,
                                   self.embedding.get() if response_match == "semantic" else embedder) \
            if self.responses is not None else None
        self.retrieval = ModuleIndex(self.embedding.get, tokenizer, lambda: self.identity, store_dir)
        self._identity = None
        self.answers = AnswerMemory(tokenizer)  # a chat answer's generated ids, for the next turn's prefix match
        self.scheduler = Scheduler(self, max_batch=max_batch, kv_budget_bytes=kv_budget_bytes,
                                   prefill_chunk=prefill_chunk)

    @property
    def identity(self) -> dict[str, str]:
        """Model, weights, config, tokenizer, dtype and chat format, hashed (computed once)."""
        if self._identity is None:
            self._identity = engine_identity(self.model, self.tokenizer, self.adapter.dtype, self.chat_format,
                                             self.fingerprint, decode="int8" if self.int8_decode else "weights")
        return self._identity

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, device: str = "auto", dtype: str = "auto",
                        **kwargs) -> Engine:
        """Load a model by name (`promptcache.models.load.load_model`): a hub id, a checkpoint
        directory, a `.gguf` file, "smollm2-135m-instruct" or "tiny"; GPU when present unless
        device="cpu". `kwargs` go to `Engine`."""
        from ..models.load import load_model

        loaded = load_model(name_or_path, device=device, dtype=dtype)
        return cls(loaded.model, loaded.tokenizer, **kwargs)

    # ---- schemas ---------------------------------------------------------------------------

    def add_schema(self, schema: str | os.PathLike | Schema, *, base_dir: str | os.PathLike | None = None,
                   ) -> SchemaLayout:
        """Parse and validate a schema (PML text, a path, or a `Schema`); encode its modules.

        Adding a schema under a name already added replaces it atomically: requests planned before
        keep the version they were bound to; unchanged modules keep their states and pins.
        """
        layout = self.modules.add(schema, base_dir)
        self.embedding.index(self.retrieval, self.modules.current(layout.name))
        return layout

    def schema_added(self, name: str) -> SchemaAdded:
        """What the last `add_schema` of `name` did: modules loaded from the disk store or encoded, and the time."""
        self.modules.current(name)  # PromptError naming the added schemas
        return self.modules.added[name]

    def remove_schema(self, name: str) -> None:
        """Forget a schema; its modules' states leave memory (a disk store keeps its files)."""
        version = self.modules.current(name)
        self.modules.remove(name)
        self.retrieval.forget([version])

    def retrieve(self, schema: str, question: str, k: int = 3) -> list[str]:
        """The names of the `k` modules of `schema` nearest `question` by meaning, nearest first.

        Candidates: top-level cached modules without parameters, outside unions (`engine.retrieval`).

        Raises:
            PromptError: an unknown schema, a bad `question` or `k`; EmbeddingError: no embedder.
        """
        return list(retrieve_modules(self.retrieval, self.modules.current(schema), question, k).names)

    def schema(self, name: str) -> SchemaLayout:
        """The current compiled layout of an added schema."""
        return self.modules.current(name).layout

    @property
    def schemas(self) -> dict[str, SchemaLayout]:
        """Added schemas by name (a snapshot)."""
        return {name: v.layout for name, v in dict(self.modules.versions).items()}

    def pin(self, schema: str, module: str = "") -> None:
        """Keep a module's states in their memory tier: never demoted or dropped."""
        self.modules.pin(schema, module)

    def unpin(self, schema: str, module: str = "") -> None:
        """Let a pinned module's states be demoted and dropped again (least recently used first)."""
        self.modules.unpin(schema, module)

    def module_states(self, schema: str, module: str = "") -> KVStates | None:
        """A module's stored states if they are in memory now (read-only; nothing is loaded)."""
        return self.modules.states(schema, module)

    def module_tier(self, schema: str, module: str = "") -> str | None:
        """Where a module's states are: "device", "host", or None (on disk or not encoded)."""
        return self.modules.tier(schema, module)

    # ---- requests: the three steps ---------------------------------------------------------

    def plan(self, prompt: str | Prompt | Sequence[dict], *, enable_cache: bool = True,
             namespace: str = "") -> RequestPlan:
        """Bind a PML prompt to its schema's current version, or tokenize a plain prompt / chat.

        Raises:
            PromptError: an unknown schema or module, a bad argument, a prompt over the context window.
        """
        if not isinstance(namespace, str):
            raise PromptError(f"namespace must be a string, got {type(namespace).__name__}")
        checks.flag("enable_cache", enable_cache)
        if isinstance(prompt, str) and is_pml(prompt):
            prompt = parse_prompt(prompt)
        elif isinstance(prompt, Prompt):
            check_prompt(prompt)  # parse_prompt checked text already; objects get the same rules
        retrieved = ()
        if isinstance(prompt, Prompt):
            version = self.modules.current(prompt.schema)
            checks.fits_window("the prompt", checks.text_bytes(prompt), self.adapter.max_positions)
            if prompt.retrieve is not None:
                prompt, retrieved = with_retrieved(self.retrieval, version, prompt)
            tokens = bind(prompt, version.layout, self.tokenizer, pad_arguments=self.pad_arguments)
            source = "modules" if enable_cache else "none"
        elif isinstance(prompt, str) or (isinstance(prompt, Sequence) and not isinstance(prompt, bytes)):
            checks.prompt_texts(prompt)
            checks.fits_window("the prompt", checks.text_bytes(prompt), self.adapter.max_positions)
            version = None
            tokens = plain_plan(prompt, self.tokenizer, self.chat_format, self._bos,
                                answers=functools.partial(self.answers.get, namespace))
            source = "prefix" if enable_cache and self.prefix is not None else "none"
        else:
            raise PromptError(f"prompt must be PML text, a Prompt, plain text or a list of chat messages, "
                              f"got {type(prompt).__name__}")
        return make_plan(tokens, source, version, namespace, self.adapter.max_positions, retrieved)

    def prefill(self, plan: RequestPlan, max_new_tokens: int = 1,
                recompute: float | Recompute | None = None) -> Prefill:
        """Fill a request cache for `plan` (room for `max_new_tokens` more) and compute the first logits.

        `recompute` overrides the engine's `recompute` for this request (None: the engine's).
        Close the result (or use it in a `with` block) when done: its cache goes back to the pool.
        """
        policy = self._recompute_policy(recompute, plan)
        capacity = plan.capacity(max_new_tokens)
        tokens = plan.tokens
        if plan.source == "none":
            spec = self._spec(None, capacity, len(tokens.token_ids))
            return self._pooled(prefill_full(self.adapter, spec, tokens.token_ids))
        if plan.source == "prefix":
            with self.prefix.match(tokens.token_ids, plan.namespace) as match:
                return self._after_prefix(plan, match, capacity)
        if self.prefix is not None and recomputes_all(policy, tokens, self.adapter):
            # the prompt's full prefill is asked for: an earlier one of the same text may be in the prefix tree
            with self.prefix.match(tokens.token_ids, plan.namespace) as match:
                if match.length >= _spliced_end(tokens):
                    return self._after_prefix(plan, match, capacity)
        spec = self._spec(Reuse("modules"), capacity, len(tokens.token_ids))
        checkout = self.modules.checkout(plan.schema, tokens.cached)
        blend = plan_blend(policy, plan.schema, tokens, list(checkout.states), self.adapter)
        pre = prefill_modules(self.adapter, spec, list(checkout.states), tokens.new_token_ids,
                              tokens.new_positions, plan.end, recompute=blend)
        pre.written_tokens, pre.modules_written = checkout.written_tokens, checkout.written
        pre.modules_hit = tuple(p for p in tokens.cached if p not in checkout.written)
        return self._pooled(pre)

    def _spec(self, reuse: Reuse | None, capacity: int, prompt_tokens: int) -> CacheSpec:
        """A request cache for `capacity` slots (the prompt's `prompt_tokens` and what may be generated), whose
        block starts with room for the prompt and `INITIAL_ROOM` more and grows as tokens are generated;
        `reuse`: what a warm block may hand over (kv.warm)."""
        initial = min(capacity, prompt_tokens + INITIAL_ROOM)
        return CacheSpec(functools.partial(self._new_cache, reuse=reuse, initial=initial), self.device, capacity)

    def _after_prefix(self, plan: RequestPlan, match: PrefixMatch, capacity: int) -> Prefill:
        """Prefill `plan`'s tokens after the prefix-tree `match`: the full prefill of its text."""
        ids = plan.token_ids
        spec = self._spec(Reuse("prefix", plan.namespace, ids[:-1]), capacity, len(ids))
        # the last token is computed: its logits start the answer
        parts = _first_tokens(match.states, min(match.length, len(ids) - 1))
        return self._pooled(prefill_prefix(self.adapter, spec, ids, parts))

    def decoder(self, plan: RequestPlan, prefill: Prefill, params: SamplingParams | None = None) -> Decoder:
        """A `Decoder` generating after `prefill` under `params` (default: greedy)."""
        params = params or SamplingParams()
        stop_ids = set() if params.ignore_eos else set(self.stop_ids)
        stop_ids.update(params.stop_token_ids)
        return Decoder(self.adapter, self.tokenizer, prefill, params, plan.token_ids, stop_ids,
                       params.stop + plan.tokens.stop)

    def warm_up(self) -> None:
        """With `compile_decode`, compile both compiled steps now (one short uncached request: a several-token
        prefill, then a decoded token), so that no client's request pays for it; nothing otherwise."""
        if self.adapter.compiled is not None:
            self.generate(WARM_UP_PROMPT, max_new_tokens=2, ignore_eos=True, enable_cache=False)

    # ---- requests: the whole --------------------------------------------------------------

    def generate(self, prompt: str | Prompt | Sequence[dict], sampling: SamplingParams | None = None, *,
                 enable_cache: bool = True, namespace: str = "", recompute: float | Recompute | None = None,
                 **kwargs) -> Completion:
        """Complete a prompt: PML text or a `Prompt` (module splicing), plain text, or chat messages
        `[{"role", "content"}]` (automatic prefix reuse).

        Args:
            sampling: a `SamplingParams`; keyword arguments (max_new_tokens, temperature, top_p, top_k,
                stop, seed, repetition_penalty, stop_token_ids, ignore_eos) override its fields.
            enable_cache: False computes every prompt token (the exactness baseline).
            namespace: keeps one tenant's prefixes and cached responses from another's.
            recompute: this request's fraction of stale spliced tokens to recompute (None: the engine's).
        """
        params = SamplingParams.merge(sampling, **kwargs)
        for item in self._run(prompt, params, enable_cache, namespace, stream=False, recompute=recompute):
            if isinstance(item, Completion):
                return item
        raise AssertionError("a request always ends with a Completion")  # pragma: no cover

    def stream(self, prompt: str | Prompt | Sequence[dict], sampling: SamplingParams | None = None, *,
               enable_cache: bool = True, namespace: str = "", recompute: float | Recompute | None = None,
               **kwargs) -> Iterator[Chunk]:
        """Like `generate`, yielding text deltas; the last chunk carries usage and finish_reason.

        Closing the iterator early (a client that went away) stops generation and frees the cache.
        """
        params = SamplingParams.merge(sampling, **kwargs)
        for item in self._run(prompt, params, enable_cache, namespace, stream=True, recompute=recompute):
            if isinstance(item, Completion):
                yield Chunk("", item.usage, item.finish_reason, item.stop_sequence)
            elif item:
                yield Chunk(item)

    def chat(self, system: str | None = None, namespace: str = ""):
        """A multi-turn `Conversation`; each turn reuses every earlier turn's states."""
        from .conversation import Conversation

        return Conversation(self, system, namespace)

    def keep_prefix(self, messages: Sequence[dict], breakpoints: Sequence[Breakpoint], namespace: str = "",
                    ) -> list[Kept]:
        """Keep a chat's states up to each breakpoint for its TTL (`engine.keep`); keeping again refreshes it.

        Call it once a request over `messages` has run: its states are then in the prefix tree. A
        breakpoint whose states are not there (no prefix cache, a full budget) holds 0 tokens.
        """
        offsets = breakpoint_offsets(lambda m: self.plan(m, namespace=namespace).token_ids, messages, breakpoints)
        ids = self.plan(list(messages), namespace=namespace).token_ids
        return [Kept(offset, 0 if self.keeper is None else self.keeper.keep(ids, offset, b.ttl_s, namespace),
                     b.ttl_s) for offset, b in zip(offsets, breakpoints)]

    def _run(self, prompt, params: SamplingParams, enable_cache: bool, namespace: str,
             stream: bool, recompute: float | Recompute | None = None) -> Iterator[str | Completion]:
        t0 = time.perf_counter()
        self._recompute_policy(recompute)  # a bad value fails before any work
        plan = self.plan(prompt, enable_cache=enable_cache, namespace=namespace)
        policy = self._recompute_policy(recompute, plan)
        rkey = self._response_key(plan, params, policy, prompt)
        if rkey is not None and (hit := self._cached_response(rkey, t0, plan.retrieved)) is not None:
            yield hit.text
            yield hit
            return
        request = self.scheduler.submit(plan, params, policy, t0=t0)
        try:
            for item in request:
                if isinstance(item, Completion):
                    if plan.schema is None and not isinstance(prompt, str):  # a chat: its next turn sends this text
                        self.answers.remember(namespace, item.text, item.token_ids)
                    if rkey is not None:
                        self.reuse.remember(rkey, {"text": item.text, "token_ids": list(item.token_ids),
                                                   "finish_reason": item.finish_reason,
                                                   "stop_sequence": item.stop_sequence,
                                                   "usage": item.usage.to_dict()})
                    yield item
                elif stream:
                    yield item
        finally:
            self.scheduler.cancel(request)  # a caller that stopped reading: it leaves the batch, its cache freed

    def remember_prefix(self, plan: RequestPlan, pre: Prefill, decoder: Decoder) -> int:
        """Store a plain prompt's or chat's states (and the reply's) for the next request, and a PML prompt's
        when they are its full prefill's (every stale state recomputed); prompt tokens written."""
        if self.prefix is None or plan.source == "none" or not pre.exact:  # prefix prefills are exact
            return 0
        ids = list(plan.token_ids) + decoder.token_ids[: decoder.fed - len(plan.token_ids)]
        states = pre.cache.states(ids, pre.key_positions[:len(ids)])
        stored = self.prefix.insert(ids, states, plan.namespace)  # copies: the block is reused
        # usage counts prompt tokens only; generated tokens are stored too, for the next chat turn
        return max(0, stored - (len(ids) - len(plan.token_ids)))

    # ---- response cache --------------------------------------------------------------------

    def _response_key(self, plan: RequestPlan, params: SamplingParams, policy: Recompute | None = None,
                      prompt=None) -> ResponseKey | None:
        """Key on everything the answer depends on: the model, the exact tokens fed and how (`response_match`:
        or the prompt's text, cleaned up)."""
        if self.responses is None or not params.deterministic:
            return None
        if policy is not None and callable(policy.rule) and plan.source == "modules":
            return None  # a rule of your own: no identity that would hold across runs
        contexts = [plan.schema.contexts[p] for p in plan.cached_modules]
        common = dict(kind="promptcache.response", **self.identity, source=plan.source, modules=contexts,
                      stop=list(plan.tokens.stop), params=params.key(), namespace=plan.namespace,
                      recompute=repr(policy) if policy is not None and plan.source == "modules" else None)
        exact = dict(token_ids=list(plan.token_ids), positions=list(plan.tokens.positions),
                     new_positions=list(plan.tokens.new_positions) if plan.source == "modules" else [])
        return self.reuse.key(common, exact, prompt)

    def _cached_response(self, key: ResponseKey, t0: float, retrieved: tuple[str, ...] = ()) -> Completion | None:
        reused = self.reuse.lookup(key)
        if reused is None:
            return None
        hit = reused.payload
        try:
            n_in, n_out = int(hit["usage"]["input_tokens"]), int(hit["usage"]["output_tokens"])
            total = time.perf_counter() - t0
            usage = Usage(n_in, n_in, 0, n_out, total, total, response_cached=True,
                          response_similarity=reused.similarity, modules_retrieved=retrieved)
            stop = hit.get("stop_sequence")
            return Completion(str(hit["text"]), tuple(int(t) for t in hit["token_ids"]), usage,
                              str(hit["finish_reason"]), stop if isinstance(stop, str) else None)
        except (KeyError, TypeError, ValueError):
            logger.warning("ignoring a malformed response-cache entry %s", key.key[:12])
            return None

    # ---- request caches --------------------------------------------------------------------

    def _new_cache(self, parts: Sequence[KVStates], capacity: int, reuse: Reuse | None = None,
                   initial: int | None = None) -> RequestCache:
        """A pooled request cache holding `parts` back to back (none: empty), room for `initial` tokens
        (default `capacity`) that grows up to `capacity`; with `reuse`, a warm block continues in place
        where it holds the same start."""
        kv_heads, head_dim = self.adapter.kv_geometry
        capacity = capacity if initial is None else min(capacity, initial)
        return request_cache(parts, capacity, num_layers=self.adapter.num_layers, kv_heads=kv_heads,
                             head_dim=head_dim, device=self.device, dtype=self.adapter.dtype, pool=self.pool,
                             reuse=reuse)

    def _recompute_policy(self, value: float | Recompute | None, plan: RequestPlan | None = None,
                          ) -> Recompute | None:
        """A request's recompute policy: when `value` is None, `retrieved_recompute` for a prompt with
        retrieved modules, else the engine's (PromptError when invalid)."""
        if value is None:
            return self.retrieved_recompute if plan is not None and plan.retrieved else self.recompute
        return recompute_policy(value)

    def _pooled(self, pre: Prefill) -> Prefill:
        """Give the block back on close, with a record of what it holds (`kv.warm`)."""
        pre.release = lambda block: self.pool.give(block, contents_of(pre.cache, pre.token_ids))
        return pre


def _spliced_end(tokens) -> int:
    """How many of a PML prompt's first tokens (position order) reach past its last spliced one."""
    new = set(tokens.new_positions)
    return 1 + max((i for i, p in enumerate(tokens.positions) if p not in new), default=-1)


def _first_tokens(states: Sequence[KVStates], n: int) -> list[KVStates]:
    """The first `n` tokens of consecutive `states`, as slices."""
    parts, left = [], n
    for st in states:
        if left <= 0:
            break
        parts.append(st.slice(0, min(left, len(st))))
        left -= len(parts[-1])
    return parts
