"""What selective recompute costs: time to first token against the recompute fraction, and the plot.

A schema of `--modules` document modules (deterministic filler prose, `--doc-tokens` each) after
a system line; the prompt skips the first document and imports every other one, so every spliced
token after the gap is stale (the worst case: the whole context after an early change). Timed,
round-robin (`common.time_interleaved`), with the median of `--repeat` runs after a warm-up:

- full: `generate(prompt, max_new_tokens=1, enable_cache=False)`, the full prefill;
- cached at each fraction: `generate(prompt, max_new_tokens=1, recompute=Recompute(f, rule))`.

With `--kept`, also a full recompute of a text an earlier request already recomputed in full, on an
engine with a prefix cache (the engine keeps such a prompt's states): `generate(prompt,
max_new_tokens=1, recompute=1.0)` again, against the full prefill in its own round robin.

Both the wall clock and this process's CPU time are recorded; the speedup is on CPU time, which
another job's load does not inflate (run with `--threads 1` so that CPU time is the work done).

With `--quality JSON[,JSON...]` (`quality.py` results), the plot shows each approximate setup's
answer agreement next to the TTFT speedup, both against the fraction: the timed rule's as solid
lines, and where the results hold them, the "oracle" and "marginal" bounds (benchmarks/oracles.py)
dashed and dotted in the same colour. `--replot RESULT` draws that plot again from a saved
result of this script, without timing anything.

    python benchmarks/recompute.py --model smollm2-135m-instruct --threads 1
    python benchmarks/recompute.py --quick                               # tiny llama, 2 modules
    python benchmarks/recompute.py --threads 1 --fractions 1 --kept      # a full recompute, then again
    python benchmarks/recompute.py --replot results/recompute-x.json --quality q.json,oracles.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    filler_text,
    load_average,
    median,
    resolve_device,
    resolve_dtype,
    result_payload,
    table,
    write_json,
)
from benchmarks.quality import FRACTIONS, load_engine, parse_fractions  # noqa: E402
from promptcache.engine.recompute import Recompute  # noqa: E402

COLUMNS = [("fraction", "frac", ".2f"), ("context_tokens", "context", "d"), ("recomputed_tokens", "recomputed", "d"),
           ("ttft_cpu_ms", "cpu ms", ".0f"), ("ttft_full_cpu_ms", "full cpu ms", ".0f"), ("speedup", "speedup", ".2f"),
           ("ttft_ms", "wall ms", ".0f"), ("ttft_full_ms", "full wall ms", ".0f"),
           ("speedup_wall", "wall speedup", ".2f")]


def schema(tokenizer, modules: int, doc_tokens: int) -> str:
    docs = "\n".join(f'  <module name="m{i}">{filler_text(tokenizer, doc_tokens, seed=100 + i)}</module>'
                     for i in range(modules))
    return f'<schema name="ttft">\n  <system>Answer questions about the documents.</system>\n{docs}\n</schema>'


def prompt(modules: int) -> str:
    return '<prompt schema="ttft">' + "".join(f"<m{i}/>" for i in range(1, modules)) + \
        "<user>What is the second document about?</user></prompt>"


def time_round_robin(settings: dict[str, Callable[[], object]], repeat: int, warmup: int = 1,
                     ) -> dict[str, list[tuple[float, float]]]:
    """(wall ms, CPU ms of this process) per repetition of each setting, round-robin, warm-ups excluded.

    NOTE: on a machine shared with other jobs the wall clock measures their load as much as ours;
    the process's CPU time (single-threaded torch: the work done) does not. CPU only.
    """
    def once(fn) -> tuple[float, float]:
        w, c = time.perf_counter(), time.process_time()
        fn()
        return (time.perf_counter() - w) * 1e3, (time.process_time() - c) * 1e3

    for fn in settings.values():
        for _ in range(warmup):
            once(fn)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in settings}
    for _ in range(repeat):
        for k, fn in settings.items():
            times[k].append(once(fn))
    return times


def timings(times: dict[str, list[tuple[float, float]]], key: str) -> dict:
    """Setting `key`'s median TTFT (wall, CPU), the full prefill's (setting "full") and the speedups."""
    full_wall, full_cpu = (median([t[i] for t in times["full"]]) for i in (0, 1))
    wall, cpu = (median([t[i] for t in times[key]]) for i in (0, 1))
    return {"ttft_ms": wall, "ttft_full_ms": full_wall, "speedup_wall": full_wall / wall,
            "ttft_cpu_ms": cpu, "ttft_full_cpu_ms": full_cpu, "speedup": full_cpu / cpu,
            "runs_ms": {"wall": [t[0] for t in times[key]], "cpu": [t[1] for t in times[key]]}}


def measure(engine, text: str, args) -> list[dict]:
    usage = {}  # setting -> the Usage of its last run

    def run(key: str, recompute):
        def go():
            usage[key] = engine.generate(text, max_new_tokens=1, enable_cache=recompute is not None,
                                         recompute=recompute).usage
        return go

    settings = {"full": run("full", None)}
    for f in args.fractions:
        settings[f"{f}"] = run(f"{f}", Recompute(f, rule=args.rule) if f > 0 else 0.0)
    times = time_round_robin(settings, args.repeat)
    plan = engine.plan(text)
    rows = []
    for f in args.fractions:
        rows.append({"fraction": f, "rule": args.rule, "context_tokens": len(plan.token_ids),
                     "spliced_tokens": plan.tokens.cached_token_count,
                     "recomputed_tokens": usage[f"{f}"].recomputed_tokens, **timings(times, f"{f}")})
    rows.append({"fraction": None, "rule": "full prefill", "runs_ms": {"wall": [t[0] for t in times["full"]],
                                                                       "cpu": [t[1] for t in times["full"]]}})
    return rows


def measure_kept(engine, schema_text: str, text: str, args) -> dict:
    """A full recompute of `text` after an earlier one, on an engine of the same model with a prefix cache
    (the warm-up run keeps the states), timed against the full prefill in the same round robin."""
    from promptcache.engine.engine import Engine

    kept = Engine(engine.model, engine.tokenizer, device=engine.device, progress=False)
    kept.add_schema(schema_text)
    usage = {}

    def go():
        usage["kept"] = kept.generate(text, max_new_tokens=1, recompute=1.0).usage

    times = time_round_robin({"full": lambda: engine.generate(text, max_new_tokens=1, enable_cache=False),
                              "kept": go}, args.repeat)
    return {"fraction": None, "rule": "full recompute, kept", "context_tokens": len(kept.plan(text).token_ids),
            "cached_tokens": usage["kept"].cached_tokens, "recomputed_tokens": usage["kept"].recomputed_tokens,
            **timings(times, "kept")}


def plot(rows: list[dict], quality: dict | None, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if quality is not None:
        rule = rows[0]["rule"]
        for setup in sorted({r["setup"] for r in quality["rows"]}):
            colour = None
            for shown, style in ((rule, "-"), ("oracle", "--"), ("marginal", ":")):
                mine = [r for r in quality["rows"] if r["setup"] == setup and r["rule"] == shown]
                pts = sorted({(r["fraction"], r["agreement"]) for r in quality["rows"]
                              if r["setup"] == setup and r["rule"] in ("-", shown)})
                if mine and len(pts) > 2:
                    label = setup if shown == rule else f"{setup}: {shown} (bound)"
                    line, = left.plot([100 * f for f, _ in pts], [a for _, a in pts], marker="o", markersize=4,
                                      linestyle=style, color=colour, label=label)
                    colour = line.get_color()
        left.axhline(0.9, color="grey", linestyle="--", linewidth=1)
        left.set(xlabel="recomputed (% of spliced tokens)", ylabel="answer agreement with full prefill",
                 title=f"agreement ({quality.get('model', '')})", ylim=(0, 1.02))
        if left.get_legend_handles_labels()[0]:
            left.legend(fontsize=8)
    right.plot([100 * r["fraction"] for r in rows], [r["speedup"] for r in rows], marker="o")
    right.axhline(4.0, color="grey", linestyle="--", linewidth=1)
    right.set(xlabel="recomputed (% of spliced tokens)", ylabel="TTFT speedup over full prefill (CPU time)",
              title=f"TTFT at {rows[0]['context_tokens']} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="as in quality.py")
    p.add_argument("--modules", type=int, default=17, help="document modules (the first is skipped)")
    p.add_argument("--doc-tokens", type=int, default=256, help="tokens per document")
    p.add_argument("--fractions", default=",".join(map(str, FRACTIONS)))
    p.add_argument("--rule", default="first", help="the selection rule timed")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quality", help="quality.py JSONs (comma-separated): plot their agreement next to the speedup")
    p.add_argument("--replot", help="a result of this script: draw its plot again (with --quality), time nothing")
    p.add_argument("--kept", action="store_true",
                   help="also time a full recompute of the same text again, its states kept (prefix cache)")
    p.add_argument("--quick", action="store_true", help="3 modules of 32 tokens, fractions 0/0.15/1, 1 repeat")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default="recompute")
    args = p.parse_args(argv)
    if args.quick:
        args.modules, args.doc_tokens, args.repeat = min(args.modules, 3), min(args.doc_tokens, 32), 1
        args.fractions = "0,0.15,1"
    args.fractions = parse_fractions(args.fractions)
    return args


def load_quality(paths: str | None) -> dict | None:
    """`quality.py` results (comma-separated paths) as one: the first one's model, every file's rows."""
    if not paths:
        return None
    results = [json.loads(Path(p).read_text()) for p in paths.split(",") if p.strip()]
    return {"model": results[0].get("model", ""), "rows": [r for q in results for r in q["rows"]]}


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.replot:
        path = Path(args.replot)
        rows = json.loads(path.read_text())["rows"]
        png = plot([r for r in rows if r["fraction"] is not None], load_quality(args.quality), path.with_suffix(".png"))
        print(f"wrote {png}" if png else "no plot: pip install matplotlib")
        return rows
    load_start = load_average()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    engine, label = load_engine(args.model, device, dtype, args.threads)
    schema_text = schema(engine.tokenizer, args.modules, args.doc_tokens)
    engine.add_schema(schema_text)
    rows = [{"model": label, **r} for r in measure(engine, prompt(args.modules), args)]
    print(table([r for r in rows if r["fraction"] is not None], COLUMNS))
    if args.kept:
        kept = {"model": label, **measure_kept(engine, schema_text, prompt(args.modules), args)}
        rows.append(kept)
        print(f"\nfull recompute again, its states kept: {kept['cached_tokens']} of {kept['context_tokens']} tokens "
              f"cached, {kept['recomputed_tokens']} recomputed, {kept['ttft_cpu_ms']:.0f} ms CPU against "
              f"{kept['ttft_full_cpu_ms']:.0f} ms for the full prefill ({kept['speedup']:.1f}x)")
    payload = result_payload("recompute", device, dtype, load_start, argv, rows, model=label,
                             torch_threads=torch.get_num_threads())
    path = write_json(args.out, f"{args.name}.json", payload)
    png = plot([r for r in rows if r["fraction"] is not None], load_quality(args.quality), path.with_suffix(".png"))
    print(f"\nwrote {path}" + (f" and {png}" if png else ""))
    return rows


if __name__ == "__main__":
    main()
