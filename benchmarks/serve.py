"""Serving benchmark: TTFT and throughput of `promptcache serve` under 1..N concurrent clients, cache on/off.

    python benchmarks/serve.py                                  # smollm2-135m-instruct, 1,2,4,8 clients
    python benchmarks/serve.py --model tiny --concurrency 1,2 --requests-per-client 1   # a smoke run

The server runs as its own process (`python -m promptcache serve`), twice at once: with the cache
(prefix reuse, the default) and with `--no-cache` (every prompt token prefilled: the baseline);
each level runs against one, then the other, round-robin over `--repeat` rounds. The clients are
threads of this process using the official openai client, each sending streamed chat
requests back to back (a closed loop). The workload: one shared system prompt of
`--system-tokens` tokens (a deployment's instructions) and a different short question per request,
`--max-tokens` generated tokens each (`ignore_eos`, so every request generates the same number).

Per (cache, concurrency): TTFT measured by the client (request sent -> first content token) p50 and
p95, the engine's own TTFT (usage.promptcache.ttft_s: without queueing and HTTP) p50, requests/s
and output tokens/s over the level's wall time (summed over rounds). `--warmup` requests per
server are excluded; with the cache they also put the system prompt in the prefix cache (the
steady state of a deployment).
The server gets `--parallel` equal to the largest concurrency, so clients are never queued by the
gate: this is the baseline (one request per forward) that batching will be measured against.
"""

from __future__ import annotations

import argparse
import os
import re
import select
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import REPO_ROOT, filler_text, load_average, result_payload, table, write_json  # noqa: E402

READY = re.compile(r"on (http://\S+/v1)")
COLUMNS = [("cache", "cache", "s"), ("concurrency", "clients", "d"), ("requests", "reqs", "d"),
           ("ttft_p50_ms", "TTFT p50 ms", ".0f"), ("ttft_p95_ms", "p95 ms", ".0f"),
           ("engine_ttft_p50_ms", "engine p50 ms", ".0f"), ("requests_per_s", "req/s", ".2f"),
           ("output_tokens_per_s", "out tok/s", ".1f"), ("cached_tokens_mean", "cached", ".0f"),
           ("prompt_tokens_mean", "prompt", ".0f")]


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def start_server(model: str, parallel: int, cache: bool, device: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "promptcache", "serve", "--model", model, "--port", "0", "--device", device,
           "--parallel", str(parallel), "--max-queue", "64", "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd + ([] if cache else ["--no-cache"]), cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    buf, deadline = b"", time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if select.select([proc.stdout], [], [], 0.5)[0]:
            buf += os.read(proc.stdout.fileno(), 4096)
            if found := READY.search(buf.decode(errors="replace")):
                return proc, found.group(1)
    proc.kill()
    sys.exit(f"the server did not start: {buf.decode(errors='replace')}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
    proc.stdout.close()


def one_request(client, model: str, system: str, question: str, max_tokens: int) -> dict:
    """One streamed chat request: client TTFT, engine TTFT, tokens."""
    t0 = time.perf_counter()
    ttft, usage = None, None
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
        max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True})
    for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
        if chunk.usage is not None:
            usage = chunk.usage
    extra = usage.model_extra["promptcache"]
    return {"ttft_s": ttft if ttft is not None else time.perf_counter() - t0, "engine_ttft_s": extra["ttft_s"],
            "output_tokens": usage.completion_tokens, "prompt_tokens": usage.prompt_tokens,
            "cached_tokens": usage.prompt_tokens_details.cached_tokens}


def run_level(url: str, model: str, system: str, concurrency: int, per_client: int, max_tokens: int,
              offset: int) -> tuple[list[dict], float]:
    """`concurrency` clients, `per_client` requests each, back to back; (results, wall seconds)."""
    import openai

    def client_loop(k: int) -> list[dict]:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=900)
        return [one_request(client, model, system, question(offset + k * per_client + i), max_tokens)
                for i in range(per_client)]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = [r for rs in pool.map(client_loop, range(concurrency)) for r in rs]
    return results, time.perf_counter() - t0


def question(i: int) -> str:
    topics = ["the weather", "a train timetable", "a recipe", "the history of tea", "a chess opening",
              "the moon", "a bicycle repair", "a birthday gift", "learning French", "saving money"]
    return f"Question {i}: in two sentences, tell me something useful about {topics[i % len(topics)]}."


def summarize(cache: str, concurrency: int, results: list[dict], wall: float) -> dict:
    ms = [r["ttft_s"] * 1e3 for r in results]
    mean = lambda key: sum(r[key] for r in results) / len(results)  # noqa: E731
    return {"cache": cache, "concurrency": concurrency, "requests": len(results), "wall_s": round(wall, 3),
            "ttft_p50_ms": percentile(ms, 0.5), "ttft_p95_ms": percentile(ms, 0.95),
            "engine_ttft_p50_ms": percentile([r["engine_ttft_s"] * 1e3 for r in results], 0.5),
            "requests_per_s": len(results) / wall,
            "output_tokens_per_s": sum(r["output_tokens"] for r in results) / wall,
            "cached_tokens_mean": mean("cached_tokens"), "prompt_tokens_mean": mean("prompt_tokens")}


def warm_up(url: str, args, system: str) -> None:
    """`--warmup` requests, excluded: the first requests of a fresh process run several times slower
    (allocator and page warm-up); with the cache they also store the system prompt (the steady state)."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=900)
    for i in range(args.warmup):
        one_request(client, args.served_name, system, question(100_000 + i), args.max_tokens)


def bench(args, system: str, levels: list[int]) -> list[dict]:
    """Both servers up at once, levels run round-robin (on, off, on, off, ...) for `--repeat` rounds,
    so that a load change on a shared machine hits both modes alike; the idle server uses no CPU."""
    servers = {}
    try:
        for mode in ("on", "off"):
            extra = [] if args.threads is None else ["--threads", str(args.threads)]
            servers[mode] = start_server(args.model, max(levels), mode == "on", args.device, extra)
        for _, url in servers.values():
            warm_up(url, args, system)
        results = {(m, c): [] for m in servers for c in levels}
        walls = dict.fromkeys(results, 0.0)
        for r in range(args.repeat):
            for c in levels:
                offset = (r * len(levels) + levels.index(c)) * 1000  # new questions, the same for both modes
                for mode, (_, url) in servers.items():
                    res, wall = run_level(url, args.served_name, system, c, args.requests_per_client,
                                          args.max_tokens, offset)
                    results[(mode, c)] += res
                    walls[(mode, c)] += wall
                    print(f"round {r + 1}, cache {mode}, {c} clients: {wall:.1f} s", flush=True)
        return [summarize(m, c, results[(m, c)], walls[(m, c)]) for m in servers for c in levels]
    finally:
        for proc, _ in servers.values():
            stop_server(proc)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--device", default="cpu")
    p.add_argument("--concurrency", default="1,2,4,8", help="comma-separated client counts")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--repeat", type=int, default=2, help="rounds over all levels and both modes")
    p.add_argument("--warmup", type=int, default=4, help="excluded requests per server before measuring")
    p.add_argument("--threads", type=int, help="the servers' --threads (default: torch's)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--system-tokens", type=int, default=512)
    p.add_argument("--note", default="", help="recorded in the JSON (e.g. what else ran on the machine)")
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    args.served_name = args.model
    levels = [int(c) for c in args.concurrency.split(",")]
    load_start = load_average()
    from promptcache.models.load import load_tokenizer

    system = "You are the assistant of a travel agency. Policies follow. " + \
        filler_text(load_tokenizer(args.model).tokenizer, args.system_tokens)
    rows = bench(args, system, levels)
    print("\n" + table(rows, COLUMNS))
    payload = result_payload("serve", torch.device(args.device), torch.float32, load_start, argv, rows,
                             model=args.model, system_tokens=args.system_tokens, max_tokens=args.max_tokens,
                             requests_per_client=args.requests_per_client, repeat=args.repeat, warmup=args.warmup,
                             server_threads=args.threads,
                             server_parallel=max(levels),
                             note=args.note)
    device = "cpu" if args.device == "cpu" else args.device.replace(":", "")
    threads = "" if args.threads is None else f"-threads{args.threads}"
    name = f"serve-{args.model}-{device}-{os.cpu_count()}core{threads}-{time.strftime('%Y%m%d')}.json"
    print(f"wrote {write_json(args.out, name, payload)}")


if __name__ == "__main__":
    main()
