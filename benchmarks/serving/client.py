"""Streamed OpenAI-API clients in a closed loop: each client thread sends its next request as soon as
the previous one has finished, until its count or the level's deadline is reached.

The client is the standard library's `http.client` (one connection per request) and a few lines of
Server-Sent Events parsing: cheap, so that the load generator takes little of the CPU it shares
with the server under test, and the same for every server.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .stats import LevelRun, Stream
from .workloads import Call, Workload


@dataclass(frozen=True)
class Target:
    """A server under test: where it listens, the model id it expects, whether it takes PML prompts."""

    host: str
    port: int
    model: str
    pml: bool


@dataclass(frozen=True)
class Sampling:
    """What every request asks for: greedy, `max_tokens` tokens exactly (EOS ignored)."""

    max_tokens: int
    timeout_s: float


def _text(event: dict) -> str:
    """The text a chunk carries (chat: delta.content; completions: text), "" for none."""
    for choice in event.get("choices") or ():
        delta = choice.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
        if text:
            return text
    return ""


def _usage(stream: Stream, event: dict) -> None:
    usage = event.get("usage")
    if isinstance(usage, dict):
        stream.output_tokens = usage.get("completion_tokens", stream.output_tokens)
        stream.prompt_tokens = usage.get("prompt_tokens", stream.prompt_tokens)
        details = usage.get("prompt_tokens_details") or {}
        if details.get("cached_tokens") is not None:
            stream.cached_tokens = details["cached_tokens"]
    timings = event.get("timings")  # llama-server: cache_n prompt tokens reused
    if isinstance(timings, dict) and stream.cached_tokens is None and "cache_n" in timings:
        stream.cached_tokens = timings["cache_n"]


def send(target: Target, call: Call, sampling: Sampling) -> Stream:
    """One streamed request; failures are recorded in `Stream.error`, never raised."""
    body = {**call.body, "model": target.model, "max_tokens": sampling.max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    conn = http.client.HTTPConnection(target.host, target.port, timeout=sampling.timeout_s)
    stream = Stream(sent=time.perf_counter())
    try:
        conn.request("POST", call.path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            stream.error = f"HTTP {resp.status}: {resp.read(300).decode(errors='replace')}"
            return stream
        while line := resp.readline():
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if _text(event):
                stream.token_times.append(time.perf_counter())
            _usage(stream, event)
    except (OSError, http.client.HTTPException, ValueError) as e:
        stream.error = f"{type(e).__name__}: {e}"
    finally:
        conn.close()
    return stream


def post_text(target: Target, path: str, text: str, timeout_s: float) -> tuple[int, str]:
    """POST a text body (a PML schema); (status, body)."""
    conn = http.client.HTTPConnection(target.host, target.port, timeout=timeout_s)
    try:
        conn.request("POST", path, text.encode(), {"Content-Type": "application/xml"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


@dataclass(frozen=True)
class Level:
    """A closed-loop run: `clients` threads, each sending at least `per_client` requests (and, with a
    long request, on until it has finished, up to `4 * per_client`), none started after `duration_s`."""

    clients: int
    per_client: int
    duration_s: float
    first_question: int
    long_max_tokens: int = 4

    @property
    def max_requests(self) -> int:
        return self.clients * 4 * self.per_client

    def question(self, client: int, n: int) -> int:
        """The question number of client `client`'s request `n`: distinct within the level."""
        return self.first_question + client * 4 * self.per_client + n


class Countdown:
    """Set once each of `n` parties has arrived (a party arriving twice counts once)."""

    def __init__(self, n: int):
        self.waiting, self.lock, self.done = set(range(n)), threading.Lock(), threading.Event()
        if n == 0:
            self.done.set()

    def arrive(self, k: int) -> None:
        with self.lock:
            self.waiting.discard(k)
            if not self.waiting:
                self.done.set()


def run_level(target: Target, workload: Workload, level: Level, sampling: Sampling, nonce: int) -> LevelRun:
    """Run one level. The long request (mix workload) is sent once every client has finished its first
    request: those gave the streams' inter-token gaps without it; the clients go on while it runs."""
    long_call = workload.long_call(nonce)
    warmed = Countdown(level.clients)
    long_done = threading.Event()
    if long_call is None:
        long_done.set()
    deadline = time.perf_counter() + level.duration_s
    results: list[list[Stream]] = [[] for _ in range(level.clients)]

    def keep_going(n: int) -> bool:
        if time.perf_counter() >= deadline or n >= 4 * level.per_client:  # the cap of Level.question
            return False
        return n < level.per_client or not long_done.is_set()

    def client(k: int) -> None:
        n = 0
        while keep_going(n):
            call = workload.call(level.question(k, n), target.pml)
            results[k].append(send(target, call, sampling))
            warmed.arrive(k)
            n += 1
        warmed.arrive(k)  # a client stopped by the deadline must not hold the long request back

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(level.clients)]
    for t in threads:
        t.start()
    long = None
    if long_call is not None:
        warmed.done.wait(timeout=sampling.timeout_s)
        long = send(target, long_call, Sampling(level.long_max_tokens, sampling.timeout_s))
        long_done.set()
    for t in threads:
        t.join()
    return LevelRun([s for rs in results for s in rs], time.perf_counter() - t0, long)


def concurrently(fn: Callable[[int], object], n: int) -> list:
    """`fn(0..n-1)` in `n` threads at once; their results in order."""
    out: list = [None] * n

    def run(k: int) -> None:
        out[k] = fn(k)

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out
