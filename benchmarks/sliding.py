"""Gemma 3 270M (sliding-window local layers): TTFT cached against uncached, and stored bytes per module.

For each context size, a document of about that many tokens (filler prose) and a series of distinct
short questions; timed round-robin in one run (warm-up excluded, medians):

- prefill_ms: the whole prompt, nothing cached (`enable_cache=False`), one token generated.
- prefix_ms: the same document with a new question after it, the previous one's prefix cached.
- module_ms: the document as a PML module, a new question per request.

Stored bytes: what the module store holds for the document module (`Engine.module_states(...).nbytes`),
against a global-only layout (every layer keeps every token: what is stored today) and a windowed
layout (local layers keeping only the last `window` tokens a later query can see), computed.

    python benchmarks/sliding.py                        # contexts 1024, 4096, 8192
    python benchmarks/sliding.py --contexts 1024 --repeat 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    filler_text,
    load_average,
    median,
    result_payload,
    table,
    time_interleaved,
    write_json,
)

COLUMNS = [("context_tokens", "context", "d"), ("prefill_ms", "uncached ms", ".0f"),
           ("prefix_ms", "prefix ms", ".0f"), ("module_ms", "module ms", ".0f"),
           ("prefix_speedup", "prefix x", ".1f"), ("module_speedup", "module x", ".1f"),
           ("module_mb", "stored MB", ".1f"), ("global_only_mb", "global-only MB", ".1f"),
           ("windowed_mb", "windowed MB", ".1f")]


class Rotation:
    """The next question each time; `setup` runs the previous one, so that it is what is cached."""

    def __init__(self, run, prompts: list[str]):
        self.run, self.prompts, self.i = run, prompts, 0

    def setup(self) -> None:
        self.i += 1
        self.run(self.prompts[self.i - 1])

    def timed(self) -> None:
        self.run(self.prompts[self.i])


def measure(engine, context: int, repeat: int) -> dict:
    doc = filler_text(engine.tokenizer, context)
    qs = [f"\n\nQuestion {i}: what is said about item {i}?\nAnswer:" for i in range(2 * repeat + 6)]
    name = f"doc{context}"
    engine.add_schema(f'<schema name="{name}"><module name="doc">{doc}</module></schema>')
    plain = [doc + q for q in qs]
    modular = [f'<prompt schema="{name}"><doc/>{q.replace("<", "&lt;")}</prompt>' for q in qs]

    def run(prompt, cache=True):
        return engine.generate(prompt, max_new_tokens=1, enable_cache=cache, ignore_eos=True)

    prefix, module = Rotation(run, plain), Rotation(run, modular)
    settings = {"prefill": lambda: run(plain[-1], cache=False), "prefix": (prefix.timed, prefix.setup),
                "module": (module.timed, module.setup)}
    t = {k: median(v) for k, v in time_interleaved(settings, "cpu", repeat=repeat).items()}
    states = engine.module_states(name, "doc")
    n, kinds, window = len(states), engine.adapter.layer_types, engine.adapter.window
    per_token_layer = states.nbytes / (n * states.num_layers)
    windowed = sum(n if kind == "full_attention" else min(n, window) for kind in kinds) * per_token_layer
    engine.remove_schema(name)
    return {"context_tokens": len(engine.plan(plain[0]).token_ids), "module_tokens": n,
            "prefill_ms": t["prefill"], "prefix_ms": t["prefix"], "module_ms": t["module"],
            "prefix_speedup": t["prefill"] / t["prefix"], "module_speedup": t["prefill"] / t["module"],
            "module_mb": states.nbytes / 1e6, "global_only_mb": per_token_layer * n * len(kinds) / 1e6,
            "windowed_mb": windowed / 1e6, "window": window,
            "local_layers": kinds.count("sliding_attention"), "global_layers": kinds.count("full_attention"),
            "repeat": repeat}


def main(argv: list[str] | None = None) -> None:
    import promptcache as pc

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma3-270m", help="a model name Engine.from_pretrained takes")
    p.add_argument("--contexts", default="1024,4096,8192", help="document sizes in tokens")
    p.add_argument("--repeat", type=int, default=3, help="timed repetitions per setting (median taken)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: a busy machine's parallel "
                   "regions would wait for every thread)")
    p.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    p.add_argument("--out", default="benchmarks/results", help="output directory")
    p.add_argument("--name", default="sliding", help="file stem of the JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = load_average()
    engine = pc.Engine.from_pretrained(args.model, device="cpu", dtype="float32", progress=False)
    rows = []
    for context in (int(c) for c in args.contexts.split(",")):
        rows.append(measure(engine, context, args.repeat))
        print(table(rows[-1:], COLUMNS), f"(load {load_average():.1f})", flush=True)
    print(table(rows, COLUMNS))
    payload = result_payload("sliding", torch.device("cpu"), torch.float32, start, argv, rows, model=args.model,
                             threads=args.threads, note=args.note)
    print("wrote", write_json(args.out, f"{args.name}.json", payload))


if __name__ == "__main__":
    main()
