"""Threads on a busy and an idle CPU: one thread, torch's default (one per core), and the default the
commands choose now (`models.threads`: one per free core), on the demo's request.

The demo's prompt (schemas/codegen.xml, every file, the default question) is answered cached (modules
spliced) and, unless `--no-uncached`, uncached (a full prefill of ~3.2k tokens), each for one token.
Each setting runs under two conditions: "loaded", with one busy-loop process per core that this script
starts and kills (an artificial load: other jobs on a shared machine), and "as is", without them (an
idle machine if nothing else runs: look at the load average printed beside it). The "auto" setting
measures the load at the moment it is chosen, as `demo.py` and `promptcache run` do at start.

    python benchmarks/threads.py                               # SmolLM2-135M-Instruct, float32, CPU
    python benchmarks/threads.py --repeat 5 --no-uncached      # cached TTFT only (seconds, not minutes)
    python benchmarks/threads.py --model tiny --quick          # offline smoke run

Prints a table and writes benchmarks/results/threads-<model>-cpu-<cores>core-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import load_average, median, result_payload, table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUSY_LOOP = "while True: pass"
COLUMNS = [("condition", "condition", ""), ("setting", "setting", ""), ("threads", "threads", "d"),
           ("load_1m", "load 1m", ".1f"), ("cached_ttft_ms", "cached TTFT ms", ",.0f"),
           ("uncached_ttft_ms", "uncached TTFT ms", ",.0f"), ("cached_vs_one", "cached / 1 thread", ".2f"),
           ("uncached_vs_one", "uncached / 1 thread", ".2f")]


@contextmanager
def busy_loops(n: int):
    """`n` processes spinning on a core each, killed (by their own pids) on exit."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(n)]
    try:
        time.sleep(1.0)  # running before anything is measured
        yield procs
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


def demo_prompt(engine) -> str:
    from promptcache.cli import read_prompt

    sys.path.insert(0, str(ROOT))
    from demo import DEFAULT_QUESTION

    layout = engine.add_schema(ROOT / "schemas" / "codegen.xml")
    return read_prompt(DEFAULT_QUESTION, layout.name, layout).text


def ttft_ms(engine, prompt: str, enable_cache: bool, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        out = engine.generate(prompt, max_new_tokens=1, enable_cache=enable_cache)
        times.append(out.usage.ttft_s * 1000)
    return median(times)


def measure(engine, prompt: str, condition: str, args: argparse.Namespace) -> list[dict]:
    from promptcache.models.threads import busy_cores, choose_threads, usable_cores

    cores = usable_cores()
    rows = []
    for setting in ("1 thread", "torch default", "auto"):
        if setting == "auto":
            threads = choose_threads(cores, busy_cores(cores))
        else:
            threads = 1 if setting == "1 thread" else cores
        torch.set_num_threads(threads)
        engine.generate(prompt, max_new_tokens=1)  # warm-up at this thread count
        row = {"condition": condition, "setting": setting, "threads": threads, "load_1m": load_average(),
               "cached_ttft_ms": ttft_ms(engine, prompt, True, args.repeat)}
        if not args.no_uncached:
            row["uncached_ttft_ms"] = ttft_ms(engine, prompt, False, args.uncached_repeat)
        rows.append(row)
        print(table([row], COLUMNS).splitlines()[-1], flush=True)
    one = rows[0]
    for row in rows:
        row["cached_vs_one"] = row["cached_ttft_ms"] / one["cached_ttft_ms"]
        if row.get("uncached_ttft_ms") is not None:
            row["uncached_vs_one"] = row["uncached_ttft_ms"] / one["uncached_ttft_ms"]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--repeat", type=int, default=5, help="cached requests per setting (median)")
    p.add_argument("--uncached-repeat", type=int, default=1, help="uncached requests per setting (median)")
    p.add_argument("--no-uncached", action="store_true", help="skip the full prefills (minutes under load)")
    p.add_argument("--conditions", default="loaded,as-is", help="loaded, as-is, or both (default: both)")
    p.add_argument("--quick", action="store_true", help="--repeat 2, cached only")
    p.add_argument("--no-store", action="store_true", help="encode the schema in this run (not timed either way)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    if args.quick:
        args.repeat, args.no_uncached = 2, True
    import promptcache as pc
    from promptcache.models.threads import usable_cores

    load_start = load_average()
    from promptcache.models.convert import default_store_dir

    store = None if args.no_store else default_store_dir()  # the demo's store: encoded once across runs
    engine = pc.Engine.from_pretrained(args.model, device="cpu", dtype="float32", progress=False, store_dir=store)
    prompt = demo_prompt(engine)
    cores = usable_cores()
    print(f"{args.model}, {cores} cores; cached and uncached TTFT of the demo's prompt\n"
          + "\n".join(table([], COLUMNS).splitlines()[:2]), flush=True)
    rows = []
    for condition in args.conditions.split(","):
        if condition == "loaded":
            with busy_loops(cores):
                rows += measure(engine, prompt, "loaded", args)
        else:
            rows += measure(engine, prompt, condition, args)
    print("\n" + table(rows, COLUMNS))
    name = f"threads-{args.model}-cpu-{cores}core-{datetime.date.today():%Y%m%d}.json"
    payload = result_payload("threads", torch.device("cpu"), torch.float32, load_start, argv, rows,
                             busy_loops=cores, prompt_tokens=len(engine.plan(prompt).token_ids),
                             note="loaded: one busy-loop process per core, started and killed by the script")
    print(f"wrote {write_json(args.out, name, payload)}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
