"""`Scheduler`: continuous batching. Every running request advances in one forward per step.

Requests are admitted between steps. A step gives prefilling requests turns (chunks of their
prompts, first come first served, `engine.turns`) within a budget of prompt tokens, then feeds the
pending token of every decoding request in one batched forward (`models.batched`), and lets each
pick its next token under its own sampling parameters, stop strings and budget:

    step      admit | prefill turns (a budget of prompt tokens) | batched decode (all decoding rows)
    request   waiting -> prefilling (turns) -> decoding (one token per step) -> done
                                   \\-> cancelled or failed: leaves at the next step, cache freed

While any request decodes, a step's prefill budget is the prompt tokens that take about as long as
the decode step itself (both measured as the scheduler goes; between `MIN_PREFILL_CHUNK` and
`prefill_chunk`), so that a long uncached prompt at most about doubles the other streams'
inter-token latency instead of stalling them for its whole prefill; while none decodes, it is
`prefill.CHUNK`.

Admission is bounded by `max_batch` running requests and by `kv_budget_bytes`: each running
request reserves the cache its prompt and its whole budget of new tokens could need (its cache
grows as it generates, `kv.cache.RequestCache.reserve`, never past that), so a running request
never runs out of room. A request that cannot fit yet waits; one that could never fit is refused
at submission with a `PromptError` naming the numbers.

`Engine.generate` and `Engine.stream` go through the engine's scheduler (a background thread
that runs steps while there is work and exits when idle). Tests may build a `Scheduler` with
`background=False` and call `step()` themselves.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..errors import PromptError
from ..models.batched import DecodeRow
from .budget import DEFAULT_KV_BUDGET_BYTES, DEFAULT_MAX_BATCH, DEFAULT_PREFILL_CHUNK
from .generate import SamplingParams
from .prefill import CHUNK, Prefill
from .recompute import Recompute
from .request import RequestPlan
from .turns import PrefillTurns
from .usage import Completion, Usage

logger = logging.getLogger(__name__)

MIN_PREFILL_CHUNK = 8  # prompt tokens a step prefills at least while requests decode
IDLE_EXIT_S = 2.0  # the background thread exits after this long without work (a new request starts it)
_LIVE: weakref.WeakSet[Scheduler] = weakref.WeakSet()  # schedulers whose thread may run (stopped at exit)


@dataclass(eq=False)
class Request:
    """A submitted request, from admission to its `Completion` (read-only outside the scheduler).

    Attributes:
        plan, params, recompute: what to run (`Engine.plan`, sampling, the recompute policy).
        reserved_bytes: the cache memory admission counts for it.
        logits: with `keep_logits`, the logits [vocab] (float32, CPU) each token was picked from.
    """

    plan: RequestPlan
    params: SamplingParams
    recompute: Recompute | None
    reserved_bytes: int
    keep_logits: bool = False
    t0: float = field(default_factory=time.perf_counter)
    logits: list[torch.Tensor] = field(default_factory=list)
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue, repr=False)
    turns: PrefillTurns | None = None
    pre: Prefill | None = None
    decoder: object | None = None
    ttft: float | None = None
    cancelled: bool = False
    ended: bool = False
    finished: threading.Event = field(default_factory=threading.Event, repr=False)

    def __iter__(self) -> Iterator[str | Completion]:
        """Text deltas, then the `Completion` (raises what failed the request)."""
        while True:
            item = self.events.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, Completion):
                return

    def cancel(self) -> None:
        """Leave the batch at the next step (idempotent; nothing happens once it ended)."""
        self.cancelled = True

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the request ended (completed, failed or cancelled and its cache freed)."""
        return self.finished.wait(timeout)


class Scheduler:
    """Continuous batching over one engine (see the module docstring).

    Args:
        engine: the `Engine` whose model, caches and stores the requests use.
        max_batch: the most requests running (prefilling or decoding) at once.
        kv_budget_bytes: request-cache memory that running requests may reserve in all.
        prefill_chunk: the most prompt tokens a step prefills while other requests decode (it prefills
            fewer where they would take longer than the decode step: `_prefill_budget`).
        background: run steps in a thread of its own (False: the caller calls `step()`).
    """

    def __init__(self, engine, *, max_batch: int = DEFAULT_MAX_BATCH,
                 kv_budget_bytes: int = DEFAULT_KV_BUDGET_BYTES, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 background: bool = True):
        for name, value in (("max_batch", max_batch), ("kv_budget_bytes", kv_budget_bytes),
                            ("prefill_chunk", prefill_chunk)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PromptError(f"invalid {name}={value!r:.80}: must be an int >= 1")
        # NOTE: a weak reference: the engine owns its scheduler, and a cycle would keep every engine (and
        # its stores) alive until the cyclic collector ran
        self.engine, self.background = weakref.proxy(engine), background
        self.max_batch, self.kv_budget_bytes, self.prefill_chunk = max_batch, kv_budget_bytes, prefill_chunk
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = self.batched_rows = self.widest = 0  # counters: steps, decode rows fed, most rows in a step
        self._decode_s: float | None = None  # a decode step's seconds, and a prompt token's (moving averages)
        self._prefill_s_per_token: float | None = None

    # ---- submitting ------------------------------------------------------------------------

    @property
    def bytes_per_token(self) -> int:
        kv_heads, head_dim = self.engine.adapter.kv_geometry
        elem = torch.empty(0, dtype=self.engine.adapter.dtype).element_size()
        return 2 * self.engine.adapter.num_layers * kv_heads * head_dim * elem

    def submit(self, plan: RequestPlan, params: SamplingParams | None = None, recompute: Recompute | None = None,
               *, keep_logits: bool = False, t0: float | None = None) -> Request:
        """Queue a planned request (`Engine.plan`); iterate the returned `Request` for its output. `t0`:
        when the request started (`time.perf_counter()`, default now), for its usage's times.

        Raises:
            PromptError: the request's cache could never fit `kv_budget_bytes`.
        """
        params = params or SamplingParams()
        tokens = plan.capacity(params.max_new_tokens)
        need = tokens * self.bytes_per_token
        if need > self.kv_budget_bytes:
            raise PromptError(
                f"the request needs up to {tokens} tokens of cache ({len(plan.token_ids)} prompt + "
                f"{plan.budget(params.max_new_tokens)} new) = {need} bytes, over the engine's kv_budget_bytes="
                f"{self.kv_budget_bytes}; lower max_new_tokens or the prompt, or raise kv_budget_bytes")
        request = Request(plan, params, recompute, need, keep_logits)
        if t0 is not None:
            request.t0 = t0
        with self._lock:
            self.waiting.append(request)
            if self.background and (self._thread is None or not self._thread.is_alive()):
                self._thread = threading.Thread(target=self._loop, name="promptcache-scheduler", daemon=True)
                self._thread.start()
                _LIVE.add(self)
            self._lock.notify()
        return request

    def cancel(self, request: Request, timeout: float = 30.0) -> None:
        """Cancel `request`; with the background thread running, return once it left the batch and its
        cache was freed (the next step), or after `timeout` seconds."""
        request.cancel()
        with self._lock:
            self._lock.notify()
            thread = self._thread
            # NOTE: never from the scheduler's own thread (a stream collected there would wait for itself)
            waits = thread is not None and thread.is_alive() and thread is not threading.current_thread()
        if waits and not request.ended:
            request.wait(timeout)

    # ---- stepping --------------------------------------------------------------------------

    def step(self) -> bool:
        """Admit, give prefills their turns, decode every decoding request once; whether work is left."""
        self._admit()
        self._drop_cancelled()
        decoding = any(r.decoder is not None for r in self.running)
        budget = self._prefill_budget() if decoding else CHUNK
        for request in [r for r in self.running if r.decoder is None]:  # first come, first served
            if budget <= 0:
                break
            t0 = time.perf_counter()
            spent = self._prefill_turn(request, budget)
            if spent:
                self._prefill_s_per_token = _ema(self._prefill_s_per_token, (time.perf_counter() - t0) / spent)
            budget -= max(1, spent)
        feeding = [r for r in self.running if r.decoder is not None and r.decoder.pending() is not None]
        if feeding:
            t0 = time.perf_counter()
            self._decode(feeding)
            self._decode_s = _ema(self._decode_s, time.perf_counter() - t0)
        self.steps += 1
        with self._lock:
            return bool(self.running or self.waiting)

    def _prefill_budget(self) -> int:
        """Prompt tokens to prefill in a step while requests decode: about as many as take the time of the
        decode step itself (measured as it goes), so the streams' inter-token latency at most about
        doubles while a long prompt is prefilled; at least `MIN_PREFILL_CHUNK`, at most `prefill_chunk`."""
        if self._decode_s is None or self._prefill_s_per_token is None:
            return min(self.prefill_chunk, MIN_PREFILL_CHUNK)
        fits = int(self._decode_s / self._prefill_s_per_token)
        return max(min(MIN_PREFILL_CHUNK, self.prefill_chunk), min(self.prefill_chunk, fits))

    def _admit(self) -> None:
        with self._lock:
            reserved = sum(r.reserved_bytes for r in self.running)
            while self.waiting and len(self.running) < self.max_batch:
                if reserved + self.waiting[0].reserved_bytes > self.kv_budget_bytes:
                    break  # waits for memory; requests behind it wait too (first come, first served)
                request = self.waiting.popleft()
                reserved += request.reserved_bytes
                request.turns = PrefillTurns(lambda r=request: self.engine.prefill(
                    r.plan, r.params.max_new_tokens, recompute=r.recompute or 0.0))
                self.running.append(request)

    def _drop_cancelled(self) -> None:
        with self._lock:
            gone = [r for r in (*self.running, *self.waiting) if r.cancelled]
            for request in gone:
                if request in self.waiting:
                    self.waiting.remove(request)
        for request in gone:
            self._end(request, None)

    def _prefill_turn(self, request: Request, tokens: int) -> int:
        """Let `request`'s prefill run up to `tokens` prompt tokens; the tokens it ran."""
        turns = request.turns
        if not turns.run(tokens):
            return turns.spent
        if turns.error is not None:
            self._end(request, turns.error)
            return turns.spent
        request.pre, request.turns = turns.result, None
        try:
            request.decoder = self.engine.decoder(request.plan, request.pre, request.params)
            self._pick(request)
        except Exception as exc:  # noqa: BLE001 - the request fails, the scheduler keeps serving
            self._end(request, exc)
        return turns.spent

    def _decode(self, decoding: list[Request]) -> None:
        """Feed every decoding request's pending token in one forward, then let each pick its next."""
        rows = []
        for r in decoding:
            token, position = r.decoder.pending()
            r.decoder.reserve()
            rows.append(DecodeRow(token, position, r.pre.cache, r.pre.key_positions, r.decoder.fed))
        try:
            logits = self.engine.adapter.decode_rows(rows)
        except Exception as exc:  # noqa: BLE001 - the batch's requests fail, the scheduler keeps serving
            logger.exception("a batched decode step failed")
            for r in decoding:
                self._end(r, exc)
            return
        self.batched_rows += len(rows)
        self.widest = max(self.widest, len(rows))
        for r, row_logits in zip(decoding, logits):
            r.decoder.advance(row_logits)
            try:
                self._pick(r)
            except Exception as exc:  # noqa: BLE001
                self._end(r, exc)

    def _pick(self, request: Request) -> None:
        """Pick the request's next token (after its prefill or a decode step), send the new text."""
        decoder = request.decoder
        if request.keep_logits and decoder.logits is not None:
            request.logits.append(decoder.logits.detach().float().cpu())
        token = decoder.step()
        if token is not None and request.ttft is None:
            request.ttft = time.perf_counter() - request.t0
        delta = decoder.delta()
        if delta:
            request.events.put(delta)
        if decoder.finished:
            self._end(request, None)

    def _end(self, request: Request, error: BaseException | None) -> None:
        """Finish a request: its Completion (or error) out, its cache back, its reservation freed."""
        if request.ended:
            return
        request.ended = True
        try:
            self._release(request, error)
        finally:
            request.finished.set()

    def _release(self, request: Request, error: BaseException | None) -> None:
        with self._lock:
            if request in self.running:
                self.running.remove(request)
        try:
            if request.turns is not None:
                request.turns.cancel()
            if error is None and not request.cancelled and request.decoder is not None:
                request.events.put(self._completion(request))
            elif error is not None:
                request.events.put(error)
        finally:
            if request.pre is not None:
                request.pre.close()

    def _completion(self, request: Request) -> Completion:
        plan, pre, decoder = request.plan, request.pre, request.decoder
        try:
            written = self.engine.remember_prefix(plan, pre, decoder)
        except Exception:  # noqa: BLE001 - a prefix-cache problem never loses the answer
            logger.warning("could not keep the request's prefix states", exc_info=True)
            written = 0
        total = time.perf_counter() - request.t0
        usage = Usage(len(plan.token_ids), pre.cached_tokens, pre.written_tokens + written,
                      len(decoder.token_ids), request.ttft or total, total, pre.modules_hit, pre.modules_written,
                      recomputed_tokens=pre.recomputed_tokens, modules_retrieved=plan.retrieved)
        return Completion(decoder.text, tuple(decoder.token_ids), usage, decoder.finish_reason, decoder.stop_string)

    # ---- the background thread -------------------------------------------------------------

    def stop(self, timeout: float = 10.0) -> None:
        """Let the background thread finish its step and exit (at interpreter exit: a thread still in
        torch code while the process tears down aborts it)."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._lock:
                if not (self.waiting or self.running) and not self._stopping:
                    self._lock.wait(IDLE_EXIT_S)
                if self._stopping or not (self.waiting or self.running):
                    self._thread = None
                    return
            try:
                self.step()
            except Exception:  # noqa: BLE001 - never leave requests hanging
                logger.exception("a scheduler step failed; failing its running requests")
                for request in list(self.running):
                    self._end(request, PromptError("the request failed inside the scheduler (see the log)"))


def _ema(old: float | None, new: float, weight: float = 0.2) -> float:
    return new if old is None else (1 - weight) * old + weight * new


@atexit.register
def _stop_all() -> None:
    for scheduler in list(_LIVE):
        scheduler.stop()
