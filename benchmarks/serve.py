"""Serving benchmark: promptcache's server against llama.cpp's llama-server and vLLM's CPU build,
1..16 concurrent streamed clients, on the same model and the same cores, in one run.

    python benchmarks/serve.py                 # every server, workload and level (see benchmarks/README.md)
    python benchmarks/serve.py --quick         # a smoke run: 1 and 2 clients, short answers
    python benchmarks/serve.py --servers promptcache,promptcache-nocache --workloads prefix:512

Each server is started by this script on 127.0.0.1 (a free port, `taskset -c --cores`), warmed up,
and stopped at the end (`serving/servers.py`). The workloads (`serving/workloads.py`): a shared 1k
and 3k system prompt with distinct questions (chat), a document with distinct questions (PML module
for promptcache, the same text as a plain prompt for the peers), and the 1k chat streams with one
uncached 4k prompt arriving mid-run (once every client has finished its first request). Per
(workload, level) the servers run one after another in the same order, round after round
(`--repeat`), so that a load change on a shared machine hits all of them alike. Each level is a
closed loop (`serving/client.py`): every client sends its next request when the previous one ends,
`--requests-per-client` each, none started after `--duration-s`. Every request is streamed,
greedy, `--max-tokens` tokens exactly (`ignore_eos`).

Per (workload, server, clients): aggregate output tokens/s over the level's wall time, TTFT p50/p99,
inter-token latency p50/p99 (gaps between one stream's tokens), and for the mix workload the
running streams' ITL p99 while the 4k prompt was prefilled against their p50 outside it
(`serving/stats.py`). Results go to `benchmarks/results/serve-*.json`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import REPO_ROOT, filler_text, load_average, result_payload, table, write_json  # noqa: E402
from benchmarks.serving import servers as srv  # noqa: E402
from benchmarks.serving.client import Level, Sampling, Target, concurrently, post_text, run_level, send  # noqa: E402
from benchmarks.serving.stats import summarize  # noqa: E402
from benchmarks.serving.workloads import LONG_TOKENS, Workload, build, parse_workloads  # noqa: E402

COLUMNS = [("workload", "workload", ""), ("clients", "clients", "d"), ("server", "server", ""),
           ("requests", "reqs", "d"), ("errors", "err", "d"), ("output_tokens_per_s", "out tok/s", ".1f"),
           ("ttft_p50_ms", "TTFT p50 ms", ".0f"), ("ttft_p99_ms", "p99 ms", ".0f"),
           ("itl_p50_ms", "ITL p50 ms", ".0f"), ("itl_p99_ms", "p99 ms", ".0f"),
           ("prompt_tokens_mean", "prompt", ".0f"), ("cached_tokens_mean", "cached", ".0f")]
MIX_COLUMNS = [("workload", "workload", ""), ("clients", "clients", "d"), ("server", "server", ""),
               ("long_ttft_ms", "4k TTFT ms", ".0f"), ("gaps_during", "gaps during", "d"),
               ("itl_p50_outside_ms", "ITL p50 without", ".0f"), ("itl_p99_during_ms", "ITL p99 during", ".0f"),
               ("stall_ratio", "p99/p50", ".2f")]
WARMUP_QUESTION = 900_000


def prepare(target: Target, workload: Workload, clients: int, sampling: Sampling) -> None:
    """Add the module workload's schema (PML servers), then `clients` concurrent warm-up requests: the
    shared context is in every cache and every llama-server slot holds it (the steady state)."""
    if workload.schema is not None and target.pml:
        status, body = post_text(target, "/v1/schemas", workload.schema, sampling.timeout_s)
        if status != 200:
            raise SystemExit(f"adding schema {workload.schema_name} failed: HTTP {status}: {body[:300]}")
    warm = Sampling(max_tokens=4, timeout_s=sampling.timeout_s)
    streams = concurrently(lambda k: send(target, workload.call(WARMUP_QUESTION + k, target.pml), warm), clients)
    if failed := [s.error for s in streams if s.error]:
        raise SystemExit(f"warm-up of {workload.spec.name} failed: {failed[0]}")


def bench(args, workloads: list[Workload], setup: srv.Setup) -> tuple[list[dict], list[dict]]:
    """(rows, the servers' descriptions); every server is stopped on the way out."""
    specs = [srv.make(name, setup) for name in args.servers]
    running: dict[str, srv.Running] = {}
    logs = srv.log_dir()
    sampling = Sampling(args.max_tokens, args.request_timeout_s)
    runs: dict[tuple[str, str, int], list] = {}
    next_question = 0  # every level gets new question numbers, the same for every server
    try:
        for spec in specs:
            t0 = time.perf_counter()
            running[spec.name] = srv.Running(spec, setup.cores, logs)
            print(f"started {spec.name} in {time.perf_counter() - t0:.0f} s (log {running[spec.name].log})", flush=True)
        targets = {name: Target("127.0.0.1", r.port, args.model, r.server.pml) for name, r in running.items()}
        for workload in workloads:
            for target in targets.values():
                prepare(target, workload, max(args.levels), sampling)
            for rnd in range(args.repeat):
                for clients in args.levels:
                    level = Level(clients, args.requests_per_client, args.duration_s, next_question)
                    next_question += level.max_requests
                    for name, target in targets.items():
                        run = run_level(target, workload, level, sampling, nonce=level.first_question)
                        runs.setdefault((workload.spec.name, name, clients), []).append(run)
                        row = summarize([run])
                        print(f"{workload.spec.name} round {rnd + 1} {clients:2d} clients {name:>20}: "
                              f"{row['output_tokens_per_s'] or 0:.1f} tok/s, TTFT p50 "
                              f"{row['ttft_p50_ms'] or 0:.0f} ms, {row['errors']} errors, {run.wall_s:.0f} s",
                              flush=True)
    finally:
        for r in running.values():
            r.stop()
    rows = [{"workload": w, "server": s, "clients": c, **summarize(rs)} for (w, s, c), rs in runs.items()]
    rows.sort(key=lambda r: (r["workload"], r["clients"], args.servers.index(r["server"])))
    return rows, [s.describe() for s in specs]


def _row(rows: list[dict], workload: str, server: str, clients: int) -> dict | None:
    return next((r for r in rows if (r["workload"], r["server"], r["clients"]) == (workload, server, clients)), None)


def verdicts(rows: list[dict]) -> dict[str, bool | None]:
    """issue 26's targets for promptcache, per workload (None: not measured in this run)."""
    out: dict[str, bool | None] = {}
    for w in dict.fromkeys(r["workload"] for r in rows):
        pc8, pc1 = _row(rows, w, "promptcache", 8), _row(rows, w, "promptcache", 1)
        llama8 = _row(rows, w, "llama-server", 8)
        if w.startswith(("prefix", "module")):
            both = pc8 and llama8 and pc8["output_tokens_per_s"] and llama8["output_tokens_per_s"]
            out[f"{w}: 8 clients, tok/s >= llama-server's and TTFT p50 below it"] = (
                bool(pc8["output_tokens_per_s"] >= llama8["output_tokens_per_s"]
                     and pc8["ttft_p50_ms"] < llama8["ttft_p50_ms"]) if both else None)
            scaling = pc8 and pc1 and pc1["output_tokens_per_s"] and pc8["output_tokens_per_s"]
            out[f"{w}: 8 clients >= 4x the tok/s of 1"] = (
                pc8["output_tokens_per_s"] >= 4 * pc1["output_tokens_per_s"] if scaling else None)
        else:
            ratios = [r["stall_ratio"] for r in rows if r["workload"] == w and r["server"] == "promptcache"
                      and r["clients"] > 1 and r.get("stall_ratio") is not None]
            out[f"{w}: running streams' ITL p99 during the 4k prefill < 3x their p50 (2+ clients)"] = (
                all(x < 3 for x in ratios) if ratios else None)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="a built-in model name (its GGUF is the peers')")
    p.add_argument("--servers", default="promptcache,llama-server,vllm", help=f"any of {', '.join(srv.NAMES)}")
    p.add_argument("--workloads", default="prefix:1024,prefix:3072,module:2048,mix:1024",
                   help="KIND:TOKENS entries, KIND one of prefix, module, mix")
    p.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated client counts")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64, help="generated per request (EOS ignored)")
    p.add_argument("--duration-s", type=float, default=300, help="no new request of a level after this")
    p.add_argument("--request-timeout-s", type=float, default=900)
    p.add_argument("--repeat", type=int, default=1, help="rounds over every level and server")
    p.add_argument("--long-tokens", type=int, default=LONG_TOKENS, help="the mix workload's uncached prompt")
    p.add_argument("--cores", help="cores every server is pinned to, e.g. 0,1 (default: all this process may use)")
    p.add_argument("--llama-threads", type=int, help="llama-server --threads/--threads-batch (default: one per core)")
    p.add_argument("--vllm-cores", help="cores vLLM's OpenMP threads bind to (default: the first of --cores; "
                   "its API server and engine process share the rest)")
    p.add_argument("--llama-server", type=Path, default=srv.LLAMA_SERVER)
    p.add_argument("--vllm-python", type=Path, default=srv.VLLM_PYTHON)
    p.add_argument("--pc-args", default="", help="extra `promptcache serve` flags, e.g. '--threads 1'")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 1 and 2 clients, 1 request each, 16 tokens, 1k workloads, a 2k long prompt")
    p.add_argument("--note", default="", help="recorded in the JSON (e.g. what else ran on the machine)")
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"))
    p.add_argument("--name", help="file stem of the JSON (default: serve-MODEL[-quick]-cpu-NcoreS-DATE)")
    args = p.parse_args(argv)
    if args.quick:
        args.concurrency = "1,2" if args.concurrency == p.get_default("concurrency") else args.concurrency
        if args.workloads == p.get_default("workloads"):
            args.workloads = "prefix:1024,module:1024,mix:1024"
        args.requests_per_client, args.max_tokens = 1, min(args.max_tokens, 16)
        args.duration_s = min(args.duration_s, 120)
        args.long_tokens = min(args.long_tokens, 2048)
    try:
        args.specs = parse_workloads(args.workloads)
        args.levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError as e:
        raise SystemExit(f"--workloads / --concurrency: {e}") from None
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if unknown := sorted(set(args.servers) - set(srv.NAMES)):
        raise SystemExit(f"--servers: unknown {', '.join(unknown)}; valid: {', '.join(srv.NAMES)}")
    if min(args.levels) < 1 or args.requests_per_client < 1 or args.max_tokens < 1:
        raise SystemExit("--concurrency entries, --requests-per-client and --max-tokens must be >= 1")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    from promptcache.models.convert import ensure_converted
    from promptcache.models.load import builtin_gguf, load_tokenizer

    load_start = load_average()
    tokenizer = load_tokenizer(args.model).tokenizer
    workloads = [build(spec, tokenizer, filler_text, args.long_tokens) for spec in args.specs]
    gguf = builtin_gguf(args.model)
    cores = [int(c) for c in args.cores.split(",")] if args.cores else sorted(os.sched_getaffinity(0))
    longest = max(s.tokens for s in args.specs) + 200 + args.max_tokens
    context = max(longest, args.long_tokens + 100) if any(s.kind == "mix" for s in args.specs) else longest
    setup = srv.Setup(args.model, gguf, ensure_converted(gguf).checkpoint, cores, max(args.levels), context,
                      args.llama_server, args.vllm_python, tuple(shlex.split(args.pc_args)), args.llama_threads,
                      [int(c) for c in args.vllm_cores.split(",")] if args.vllm_cores else None)
    t0 = time.perf_counter()
    rows, described = bench(args, workloads, setup)
    print("\n" + table(rows, COLUMNS))
    if mix := [r for r in rows if "stall_ratio" in r]:
        print("\n" + table(mix, MIX_COLUMNS))
    met = verdicts(rows)
    for target, ok in met.items():
        print(f"target {target}: {'not measured' if ok is None else 'met' if ok else 'NOT met'}")
    payload = result_payload("serve", torch.device("cpu"), "server defaults", load_start, argv, rows,
                             model=args.model, gguf=gguf.name, servers=described, cores=cores,
                             workloads=[s.name for s in args.specs], concurrency=args.levels,
                             requests_per_client=args.requests_per_client, max_tokens=args.max_tokens,
                             duration_s=args.duration_s, repeat=args.repeat, quick=args.quick,
                             long_prompt_tokens=args.long_tokens, wall_s=round(time.perf_counter() - t0, 1),
                             met=met, note=args.note)
    quick = "-quick" if args.quick else ""
    stem = args.name or f"serve-{args.model}{quick}-cpu-{os.cpu_count()}core-{time.strftime('%Y%m%d')}"
    name = f"{stem}.json"
    print(f"wrote {write_json(args.out, name, payload)}")
    return rows


if __name__ == "__main__":
    main()
