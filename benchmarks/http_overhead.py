"""The HTTP layer's overhead: TTFT and tokens/s of `promptcache serve` (FastAPI on uvicorn, streamed
chat through the openai client) against the same engine called in-process (`Engine.stream`).

    python benchmarks/http_overhead.py                      # smollm2-135m-instruct, 1 and 8 clients
    python benchmarks/http_overhead.py --model tiny --rounds 1   # a smoke run

Both sides get the same requests: a shared system prompt of `--system-tokens` tokens (in the prefix
cache after the warm-up) and a new question per request, `--max-tokens` generated tokens each
(`ignore_eos`), greedy, torch on `--threads` threads. The server runs as its own process with
`--parallel` equal to the clients; the in-process side runs one thread per client. Rounds alternate
engine, server, engine, ... so that a busy machine weighs on both alike. TTFT: request sent -> first
text (the client's clock); tokens/s: output tokens per second of one stream after its first token,
the median over requests.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import REPO_ROOT, filler_text, load_average, result_payload, table, write_json  # noqa: E402


def engine_request(engine, messages: list[dict], *, max_tokens: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    first, n = None, 0
    for chunk in engine.stream(messages, max_new_tokens=max_tokens, ignore_eos=True):
        if chunk.text and first is None:
            first = time.perf_counter()
        if chunk.usage is not None:
            n = chunk.usage.output_tokens
    end = time.perf_counter()
    return first - t0, (n - 1) / (end - first)


def server_request(client, model: str, messages: list[dict], *, max_tokens: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    first, n = None, 0
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, stream=True,
                                                temperature=0, stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True}):
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter()
        if chunk.usage is not None:
            n = chunk.usage.completion_tokens
    end = time.perf_counter()
    return first - t0, (n - 1) / (end - first)


def start(model: str, clients: int, threads: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "promptcache", "serve", "--model", model, "--port", "0", "--device", "cpu",
           "--parallel", str(clients), "--threads", str(threads), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    url = proc.stdout.readline().split(" on ")[1].strip()
    import urllib.request

    while True:  # listens at once; ready when /health says so
        try:
            urllib.request.urlopen(url.removesuffix("/v1") + "/health")
            return proc, url
        except OSError:
            time.sleep(0.5)


def run_level(ask, prompts: list[list[dict]], clients: int) -> list[tuple[float, float]]:
    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(ask, prompts))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--clients", default="1,8")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--system-tokens", type=int, default=500)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load_start = load_average()
    import openai

    from promptcache.engine.engine import Engine

    engine = Engine.from_pretrained(args.model, device="cpu", progress=False)
    system = {"role": "system", "content": filler_text(engine.tokenizer, args.system_tokens)}
    rows = []
    for clients in map(int, args.clients.split(",")):
        proc, url = start(args.model, clients, args.threads)
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
        sides = {"engine": functools.partial(engine_request, engine, max_tokens=args.max_tokens),
                 "http": functools.partial(server_request, client, args.model, max_tokens=args.max_tokens)}
        results: dict[str, list[tuple[float, float]]] = {"engine": [], "http": []}
        for ask in sides.values():  # warm-up: the system prompt into each side's prefix cache
            ask([system, {"role": "user", "content": "Hello?"}])
        for r in range(args.rounds):
            for side, ask in sides.items():
                prompts = [[system, {"role": "user", "content": f"Question {r}-{i}-{side}: what now?"}]
                           for i in range(clients)]
                results[side] += run_level(ask, prompts, clients)
        proc.terminate()
        proc.wait(60)
        for side, got in results.items():
            rows.append({"side": side, "clients": clients, "requests": len(got),
                         "ttft_ms_p50": 1000 * statistics.median(t for t, _ in got),
                         "tokens_per_s_p50": statistics.median(s for _, s in got)})
    print(table(rows, [("side", "side", "s"), ("clients", "clients", "d"), ("requests", "requests", "d"),
                       ("ttft_ms_p50", "TTFT ms p50", ".0f"), ("tokens_per_s_p50", "tok/s p50", ".1f")]))
    payload = result_payload("http_overhead", torch.device("cpu"), torch.float32, load_start, None, rows,
                             model=args.model, threads=args.threads, cpus=os.cpu_count())
    day = time.strftime("%Y%m%d")
    print(write_json(args.out, f"http-overhead-{args.model}-cpu-{day}.json", payload))


if __name__ == "__main__":
    main()
