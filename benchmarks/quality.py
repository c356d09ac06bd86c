"""Output quality with and without the cache on LongBench-format tasks, in two setups.

- single: each example's whole context is one module, the question the user turn (the paper's
  setup). Every module is selected in schema order, so the cached prefill is the full prefill and
  cached outputs must equal uncached ones: agreement 1.0 (printed, and flagged when not).
- multi: a dataset's distinct documents are the modules of one schema; each question imports only
  its own documents, so they sit at their schema positions with gaps between them: this is where
  splicing approximates (the uncached baseline runs the same tokens at contiguous positions).

Per dataset and setup: LongBench's metric (benchmarks/metrics.py, 0-100 scale) of uncached and
cached outputs, and agreement of cached with uncached outputs (exact-match rate and mean token F1,
0-1). With `--scorer PATH`, also a learned metric (benchmarks/scorers.py) against the references
and between cached and uncached outputs.

    python benchmarks/quality.py --quick                         # shipped samples, tiny models
    python benchmarks/quality.py --model /path/to/ckpt --data /path/to/LongBench/data --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    load_average,
    load_model,
    resolve_device,
    resolve_dtype,
    result_payload,
    table,
    write_json,  # noqa: E402
)
from benchmarks.longbench import (  # noqa: E402
    Example,
    collect_documents,
    load_tasks,
    multi_document_prompt,
    multi_document_schema,
    single_module_schema,
)
from benchmarks.metrics import metric_for, score, token_f1  # noqa: E402

TINY_SHAPE = {"hidden_size": 64, "num_layers": 2}
SETUPS = ("single", "multi")
COLUMNS = [("model", "model", ""), ("setup", "setup", ""), ("dataset", "dataset", ""),
           ("metric", "metric", ""),
           ("n", "n", "d"), ("score_no_cache", "no-cache", ".1f"), ("score_cache", "cache", ".1f"),
           ("agreement", "agree EM", ".2f"), ("agreement_f1", "agree F1", ".2f"),
           ("learned_no_cache", "learned no-cache", ".3f"), ("learned_cache", "learned cache", ".3f"),
           ("learned_agreement", "learned agree", ".3f")]


def metric_name(dataset: str) -> str:
    fn = metric_for(dataset)
    inner = fn.__closure__[0].cell_contents if fn.__closure__ else fn  # unwrap _without_classes
    return getattr(inner, "__name__", "metric")


def _name(prefix: str, dataset: str, i: int | str) -> str:
    return f"q_{prefix}_{''.join(c if c.isalnum() else '_' for c in dataset)}_{i}"


def prompts_for(engine, setup: str, dataset: str, examples: list[Example]) -> list[str]:
    """Add the schemas `setup` needs for `examples`; one prompt per example."""
    if setup == "multi":
        name = _name("m", dataset, 0)
        docs = collect_documents(examples)  # split the contexts once, not once per prompt
        engine.add_schema(multi_document_schema(docs, name, dataset))
        return [multi_document_prompt(ex, docs, name, dataset) for ex in examples]
    prompts, seen = [], {}
    for i, ex in enumerate(examples):
        # Examples sharing a context share a schema.
        name = seen.setdefault(ex.context, _name("s", dataset, i))
        pml = single_module_schema(ex, name, dataset)
        if name == _name("s", dataset, i):
            engine.add_schema(pml.schema)
        prompts.append(pml.prompt)
    return prompts


def generate_both(engine, prompts: list[str], max_new_tokens: int) -> tuple[list[str], list[str]]:
    uncached, cached = [], []
    for p in prompts:
        uncached.append(engine.generate(p, max_new_tokens=max_new_tokens, enable_cache=False).text)
        cached.append(engine.generate(p, max_new_tokens=max_new_tokens).text)
    return uncached, cached


def _mean(values) -> float:
    values = list(values)
    return float(statistics.fmean(values)) if values else 0.0


def learned(scorer, examples: list[Example], uncached: list[str], cached: list[str]) -> dict:
    def best(preds: list[str]) -> float:
        return _mean(max(scorer.score([p] * len(ex.answers), list(ex.answers)), default=0.0)
                     for p, ex in zip(preds, examples, strict=True))

    return {"learned_no_cache": best(uncached), "learned_cache": best(cached),
            "learned_agreement": _mean(scorer.score(cached, uncached))}


def evaluate(engine, label: str, setup: str, task: str, examples: list[Example], args, scorer) -> dict:
    dataset = examples[0].dataset  # the LongBench name: picks template and metric (task: the file stem)
    prompts = prompts_for(engine, setup, dataset, examples)
    uncached, cached = generate_both(engine, prompts, args.max_new_tokens)

    def metric(preds: list[str]) -> float:
        pairs = zip(preds, examples, strict=True)
        return 100 * _mean(score(dataset, p, ex.answers, ex.all_classes) for p, ex in pairs)

    row = {"model": label, "setup": setup, "task": task, "dataset": dataset, "metric": metric_name(dataset),
           "n": len(examples),
           "score_no_cache": metric(uncached), "score_cache": metric(cached),
           "agreement": _mean(float(c == u) for c, u in zip(cached, uncached, strict=True)),
           "agreement_f1": _mean(token_f1(c, u) for c, u in zip(cached, uncached, strict=True))}
    if scorer is not None:
        row.update(learned(scorer, examples, uncached, cached))
    if args.keep_outputs:
        row["outputs"] = [{"id": ex.id, "no_cache": u, "cache": c}
                          for ex, u, c in zip(examples, uncached, cached, strict=True)]
    return row


def run_model(name: str, tasks: dict[str, list[Example]], args, device, dtype, scorer) -> list[dict]:
    from promptcache.engine.engine import Engine

    shape = None if Path(name).is_dir() else TINY_SHAPE
    model, tok, label = load_model(name, device, dtype, max_positions=args.max_positions, shape=shape)
    engine = Engine(model, tok, progress=False)
    rows = []
    for setup in args.setups:
        for task, examples in tasks.items():
            if not examples:
                continue
            rows.append(evaluate(engine, label, setup, task, examples, args, scorer))
            print(f"  {label} {setup:6s} {task:30s} agreement {rows[-1]['agreement']:.2f}", flush=True)
    return rows


def exact_setup_check(rows: list[dict]) -> bool:
    """Print the single-setup agreement, which the maths says must be 1.0."""
    single = [r for r in rows if r["setup"] == "single"]
    if not single:
        return True
    total = sum(r["n"] for r in single)
    agreement = sum(r["agreement"] * r["n"] for r in single) / max(1, total)
    ok = agreement == 1.0
    print(f"exact setup (single module + question, all selected): agreement {agreement:.3f} over {total} "
          f"outputs " + ("(as expected)" if ok else "(EXPECTED 1.0: cached output differs from uncached)"))
    return ok


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(Path(__file__).parent / "data"),
                   help="LongBench-format task directory")
    p.add_argument("--datasets", help="task file stems (comma-separated; default: all)")
    p.add_argument("--limit", type=int, help="at most this many examples per task")
    p.add_argument("--models", default="llama,falcon,mpt", help="built-in tiny models (comma-separated)")
    p.add_argument("--model", help="a local checkpoint directory (overrides --models)")
    p.add_argument("--setups", default="single,multi", help="single, multi or both")
    p.add_argument("--scorer", help="a local learned-metric checkpoint (benchmarks/scorers.py)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="auto", help="auto (float32 on cpu, bfloat16 on cuda), float32, ...")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-positions", type=int, default=8192, help="context window of built-in models")
    p.add_argument("--keep-outputs", action="store_true", help="store every output in the JSON")
    p.add_argument("--quick", action="store_true", help="3 examples per task, 8 new tokens")
    p.add_argument("--out", default="benchmarks/results", help="directory for quality.json")
    p.add_argument("--name", default="quality", help="file stem of the output")
    args = p.parse_args(argv)
    if args.quick:
        args.max_new_tokens = min(args.max_new_tokens, 8)
        args.limit = 3 if args.limit is None else args.limit
    args.models = [args.model] if args.model else [m.strip() for m in args.models.split(",") if m.strip()]
    args.setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    bad = [s for s in args.setups if s not in SETUPS]
    if bad:
        p.error(f"unknown setup(s) {bad}; valid: {', '.join(SETUPS)}")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    load_start = load_average()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    datasets = args.datasets.split(",") if args.datasets else None
    tasks = load_tasks(args.data, datasets, args.limit)
    scorer = None
    if args.scorer:
        from benchmarks.scorers import load_scorer

        scorer = load_scorer(args.scorer, device=device)
    rows = []
    for name in args.models:
        rows += run_model(name, tasks, args, device, dtype, scorer)
    print()
    print(table(rows, [c for c in COLUMNS if any(c[0] in r for r in rows)]))
    exact = exact_setup_check(rows)
    payload = result_payload("quality", device, dtype, load_start, argv, rows, exact_setup_agreement_ok=exact)
    print(f"\nwrote {write_json(args.out, f'{args.name}.json', payload)}")
    return rows


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
