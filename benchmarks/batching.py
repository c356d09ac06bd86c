"""Continuous batching in the engine: decode tokens/s against the batch width, and what a long prefill does
to the running streams' inter-token latency for each `prefill_chunk`.

    python benchmarks/batching.py                          # smollm2-135m-instruct, float32
    python benchmarks/batching.py --model tiny --widths 1,2 --chunks 32 --long-tokens 256   # a smoke run

Everything goes through the engine's public `Scheduler` (`background=False`: this script calls
`step()`), on one engine, warm-up excluded:

- widths: B requests share a `--context`-token prompt (in the prefix cache, as a deployment's system
  prompt is) with a distinct question each; once all B decode, `--steps` steps are timed. Per width:
  the median step, decode tokens/s (B / step) and the speedup over one request.
- chunks: 8 requests decode; then one uncached `--long-tokens` prompt arrives. Per `prefill_chunk`:
  the running streams' step time p50 without it and p99 while it is prefilled (a step is one token of
  every stream: the inter-token latency the engine adds), their ratio, and the long prompt's TTFT.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import promptcache as pc  # noqa: E402
from benchmarks.common import filler_text, load_average, result_payload, table, write_json  # noqa: E402

WIDTH_COLUMNS = [("width", "rows", "d"), ("step_ms", "step ms", ".1f"), ("tokens_per_s", "tok/s", ".1f"),
                 ("speedup", "x one", ".2f")]
CHUNK_COLUMNS = [("prefill_chunk", "chunk", "d"), ("step_p50_ms", "p50 without", ".1f"),
                 ("step_p99_during_ms", "p99 during", ".1f"), ("ratio", "p99/p50", ".2f"),
                 ("long_ttft_s", "long TTFT s", ".2f"), ("steps_during", "steps", "d")]


def _decoding(scheduler: pc.Scheduler, engine: pc.Engine, prompts: list, max_new: int) -> list:
    requests = [scheduler.submit(engine.plan(p), pc.SamplingParams(max_new_tokens=max_new, ignore_eos=True))
                for p in prompts]
    while any(r.decoder is None for r in requests):
        scheduler.step()
    return requests


def _drain(scheduler: pc.Scheduler) -> None:
    while scheduler.step():
        pass


def measure_width(engine: pc.Engine, context: str, width: int, steps: int) -> dict:
    scheduler = pc.Scheduler(engine, max_batch=width, background=False)
    _decoding(scheduler, engine, [f"{context}\nQuestion {i}: what is item {i}?" for i in range(width)], steps + 8)
    for _ in range(3):  # warm-up
        scheduler.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        scheduler.step()
        times.append(time.perf_counter() - t0)
    _drain(scheduler)
    step = statistics.median(times)
    return {"width": width, "step_ms": step * 1e3, "tokens_per_s": width / step}


def measure_chunk(engine: pc.Engine, context: str, long_prompt: str, chunk: int, streams: int,
                  steps: int) -> dict:
    scheduler = pc.Scheduler(engine, prefill_chunk=chunk, background=False)
    _decoding(scheduler, engine, [f"{context}\nQuestion {i}: what is item {i}?" for i in range(streams)], 100_000)
    without = []
    for _ in range(steps):
        t0 = time.perf_counter()
        scheduler.step()
        without.append(time.perf_counter() - t0)
    t_long = time.perf_counter()
    long = scheduler.submit(engine.plan(long_prompt, enable_cache=False), pc.SamplingParams(max_new_tokens=1))
    during = []
    while long.ttft is None and not long.ended:
        t0 = time.perf_counter()
        scheduler.step()
        during.append(time.perf_counter() - t0)
    long_ttft = time.perf_counter() - t_long
    for r in list(scheduler.running):
        r.cancel()
    _drain(scheduler)
    p50 = statistics.median(without)
    p99 = sorted(during)[min(len(during) - 1, int(0.99 * len(during)))]
    return {"prefill_chunk": chunk, "step_p50_ms": p50 * 1e3, "step_p99_during_ms": p99 * 1e3,
            "ratio": p99 / p50, "long_ttft_s": long_ttft, "steps_during": len(during)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--context", type=int, default=1024, help="tokens of the shared prompt")
    p.add_argument("--widths", default="1,2,4,8,16")
    p.add_argument("--steps", type=int, default=20, help="timed steps per width / without the long prompt")
    p.add_argument("--chunks", default="32,64,128,256")
    p.add_argument("--streams", type=int, default=8, help="running streams while the long prompt is prefilled")
    p.add_argument("--long-tokens", type=int, default=4096)
    p.add_argument("--int8-decode", action="store_true")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--name", help="file stem of the JSON (default: batching-MODEL-cpu-DATE)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = pc.Engine.from_pretrained(args.model, device="cpu", dtype=args.dtype, int8_decode=args.int8_decode,
                                       progress=False)
    context = filler_text(engine.tokenizer, args.context)
    engine.generate(context + "\nQuestion: warm-up?", max_new_tokens=2)  # the shared prompt in the prefix cache
    load_before = load_average()
    widths = [measure_width(engine, context, int(w), args.steps) for w in args.widths.split(",")]
    one = next((w["step_ms"] for w in widths if w["width"] == 1), None)
    for w in widths:
        w["speedup"] = w["tokens_per_s"] / (1e3 / one) if one else float("nan")
        print(f"width {w['width']}: {w['step_ms']:.1f} ms a step, {w['tokens_per_s']:.1f} tok/s", flush=True)
    long_prompt = filler_text(engine.tokenizer, args.long_tokens, seed=7)
    chunks = []
    for c in args.chunks.split(","):
        chunks.append(measure_chunk(engine, context, long_prompt, int(c), args.streams, args.steps))
        print(f"chunk {c}: {chunks[-1]}", flush=True)
    print(table(widths, WIDTH_COLUMNS))
    print(table(chunks, CHUNK_COLUMNS))
    payload = result_payload("batching", engine.device, engine.adapter.dtype, load_before, argv, widths,
                             chunks=chunks, threads=args.threads, int8_decode=args.int8_decode)
    name = args.name or f"batching-{args.model}-{args.dtype}-cpu-2core-{time.strftime('%Y%m%d')}"
    print("wrote", write_json(args.out, f"{name}.json", payload))
    return payload


if __name__ == "__main__":
    main()
