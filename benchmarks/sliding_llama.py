"""llama.cpp's side of benchmarks/sliding.py: the same GGUF and prompts through a `llama-server` binary.

`benchmarks/peer.py` drives llama.cpp through llama-cpp-python; where that package is not built,
this script starts a `llama-server` (one slot, the given threads) on the GGUF and times, per
context size (round-robin, medians, wall-clock ms of the HTTP call):

- prefill_ms: the document and a question, `cache_prompt: false` (nothing reused), one token.
- prefix_ms: the document and a new question right after the previous one (`cache_prompt: true`).
- prefix_evaluated: prompt tokens the server says it evaluated for that request (`timings.prompt_n`):
  about the question's length where the document's states were reused, the whole prompt where the
  sliding-window cache could not be rewound to the shared prefix.

    python benchmarks/sliding_llama.py --server path/to/llama-server --gguf path/to/gemma.gguf
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import filler_text, load_average, median, table, write_json  # noqa: E402

COLUMNS = [("context_tokens", "context", "d"), ("prefill_ms", "uncached ms", ".0f"),
           ("prefix_ms", "prefix ms", ".0f"),
           ("prefix_speedup", "prefix x", ".1f"), ("prefix_evaluated", "evaluated", "d")]


def post(port: int, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/completion", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=3600) as resp:
        return json.loads(resp.read())


def timed(port: int, prompt: str, cache: bool) -> tuple[float, int]:
    start = time.perf_counter()
    out = post(port, {"prompt": prompt, "n_predict": 1, "temperature": 0.0, "cache_prompt": cache})
    return (time.perf_counter() - start) * 1e3, int(out.get("timings", {}).get("prompt_n", -1))


def measure(port: int, tokenizer, context: int, repeat: int) -> dict:
    doc = filler_text(tokenizer, context)
    qs = [f"\n\nQuestion {i}: what is said about item {i}?\nAnswer:" for i in range(2 * repeat + 4)]
    prefill, prefix, evaluated = [], [], []
    timed(port, doc + qs[0], True)  # warm-up; leaves the document cached
    for i in range(1, repeat + 1):
        prefill.append(timed(port, doc + qs[-i], False)[0])
        timed(port, doc + qs[2 * i], True)  # the previous question: what is cached
        ms, n = timed(port, doc + qs[2 * i + 1], True)
        prefix.append(ms)
        evaluated.append(n)
    return {"context_tokens": len(tokenizer(doc + qs[0]).input_ids), "prefill_ms": median(prefill),
            "prefix_ms": median(prefix), "prefix_speedup": median(prefill) / median(prefix),
            "prefix_evaluated": max(evaluated), "repeat": repeat}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", required=True, help="a llama-server binary")
    p.add_argument("--gguf", default=None, help="GGUF file (default: the built-in gemma3-270m)")
    p.add_argument("--contexts", default="1024,4096,8192", help="document sizes in tokens")
    p.add_argument("--repeat", type=int, default=2, help="timed repetitions per setting (median taken)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads")
    p.add_argument("--port", type=int, default=18573)
    p.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    p.add_argument("--out", default="benchmarks/results", help="output directory")
    p.add_argument("--name", default="sliding-llama", help="file stem of the JSON")
    args = p.parse_args(argv)
    from promptcache.models.load import builtin_gguf, load_tokenizer

    gguf = Path(args.gguf) if args.gguf else builtin_gguf("gemma3-270m")
    tokenizer = load_tokenizer(str(gguf)).tokenizer
    contexts = [int(c) for c in args.contexts.split(",")]
    server = subprocess.Popen([args.server, "-m", str(gguf), "--port", str(args.port), "-t", str(args.threads),
                               "-tb", str(args.threads), "-c", str(max(contexts) + 512), "-np", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start, rows = load_average(), []
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{args.port}/health", timeout=5)
                break
            except OSError:
                time.sleep(1)
        for context in contexts:
            rows.append(measure(args.port, tokenizer, context, args.repeat))
            print(table(rows[-1:], COLUMNS), f"(load {load_average():.1f})", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(table(rows, COLUMNS))
    payload = {"benchmark": "sliding-llama", "gguf": str(gguf), "server": args.server, "threads": args.threads,
               "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "note": args.note,
               "load_average_1m": {"start": start, "end": load_average()}, "rows": rows}
    print("wrote", write_json(args.out, f"{args.name}.json", payload))


if __name__ == "__main__":
    main()
