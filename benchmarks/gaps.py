"""Where splicing approximates: how far cached outputs drift from uncached ones, per kind of gap.

One schema per model: a system line, documents `a` and `b`, a union (scaffold member `detailed`,
the longest, and `brief`), a module `trip` with a parameter, and a last document `c`. Each case
asks the same questions over a different selection:

- exact: a, b, detailed, trip with its scaffold as the argument, c, in schema order: the cached
  prefill is the full prefill (the control: no gap).
- skipped: a and c only: position gaps where b, the union and trip were, and c's states were
  computed with them in context.
- union: a, b, brief, trip, c: `brief` sits at the union's start, followed by a position gap to
  the union's end (the longest member's), and trip and c were encoded after `detailed`.
- parameter: a, b, detailed, trip with another argument, c: the argument is computed fresh, but trip's
  text after it and c were encoded with the scaffold filler there.

The uncached baseline runs the same prompt tokens at contiguous positions. Per case: the
first-token distributions (KL(uncached || cached) in nats, top-1 agreement, max |logit diff|)
and greedy outputs (exact-match agreement, token F1). With random weights these measure the
maths' sensitivity, not answer quality; pass `--model PATH` for a real checkpoint.

    python benchmarks/gaps.py --quick
    python benchmarks/gaps.py --model /path/to/ckpt --device cuda --doc-tokens 1024
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    filler_text,
    load_average,
    load_model,
    resolve_device,
    resolve_dtype,
    result_payload,
    table,
    write_json,
)
from benchmarks.metrics import token_f1  # noqa: E402
from promptcache.markup.layout import encode_text  # noqa: E402

QUESTIONS = ["What does the first document say about the city?", "Summarise the documents in one line.",
             "Which document mentions the hotel?", "How long is the trip?", "What should the traveller avoid?",
             "Name one thing the last document lists."]
SCAFFOLD, ARGUMENT = "seven or eight", "twelve"  # the parameter's scaffold, and the argument that differs
CASES = {
    "exact": f'<a/><b/><detailed/><trip days="{SCAFFOLD}"/><c/>',
    "skipped": "<a/><c/>",
    "union": f'<a/><b/><brief/><trip days="{SCAFFOLD}"/><c/>',
    "parameter": f'<a/><b/><detailed/><trip days="{ARGUMENT}"/><c/>',
}
COLUMNS = [("model", "model", ""), ("case", "case", ""), ("n", "n", "d"), ("top1_agreement", "top-1 agree", ".2f"),
           ("mean_kl", "mean KL", ".4f"), ("max_abs_logit_diff", "max |dlogit|", ".3f"),
           ("agreement", "agree EM", ".2f"), ("agreement_f1", "agree F1", ".2f")]


def gap_schema(tokenizer, doc_tokens: int) -> str:
    def doc(seed: int) -> str:
        return filler_text(tokenizer, doc_tokens, seed=seed)

    return f"""<schema name="gaps">
  <system>You answer questions about the documents below.</system>
  <module name="a">{doc(1)}</module>
  <module name="b">{doc(2)}</module>
  <union scaffold="detailed">
    <module name="brief">Answer briefly.</module>
    <module name="detailed">Answer in detail, citing the document each fact comes from, step by step.</module>
  </union>
  <module name="trip">The trip lasts <parameter name="days" length="{len(encode_text(tokenizer, SCAFFOLD))}"
    scaffold="{SCAFFOLD}"/> days, by train and by boat.</module>
  <module name="c">{doc(3)}</module>
</schema>"""


def first_logits(engine, prompt: str, cached: bool) -> torch.Tensor:
    with engine.prefill(engine.plan(prompt, enable_cache=cached)) as pre:
        return pre.logits.float()


def measure_case(engine, model_label: str, case: str, selection: str, args) -> dict:
    kls, top1, diffs, em, f1 = [], [], [], [], []
    for q in QUESTIONS[: args.questions]:
        prompt = f'<prompt schema="gaps">{selection}<user>{q}</user></prompt>'
        cached, full = first_logits(engine, prompt, True), first_logits(engine, prompt, False)
        kl = torch.nn.functional.kl_div(cached.log_softmax(-1), full.log_softmax(-1), log_target=True,
                                        reduction="sum")
        kls.append(max(0.0, float(kl)))  # >= 0 in exact arithmetic; rounding can give -1e-9
        top1.append(float(cached.argmax() == full.argmax()))
        diffs.append(float((cached - full).abs().max()))
        outs = [engine.generate(prompt, max_new_tokens=args.max_new_tokens, ignore_eos=True, enable_cache=c)
                for c in (True, False)]
        em.append(float(outs[0].token_ids == outs[1].token_ids))
        f1.append(token_f1(outs[0].text, outs[1].text))
    return {"model": model_label, "case": case, "n": len(kls), "top1_agreement": statistics.mean(top1),
            "mean_kl": statistics.mean(kls), "max_abs_logit_diff": max(diffs), "agreement": statistics.mean(em),
            "agreement_f1": statistics.mean(f1)}


def run_model(name: str, args, device, dtype) -> list[dict]:
    from promptcache.engine.engine import Engine

    shape = {"hidden_size": args.hidden_size, "num_layers": args.layers}
    model, tok, label = load_model(name, device, dtype, max_positions=4 * args.doc_tokens + 512, shape=shape)
    engine = Engine(model, tok, progress=False, prefix_cache=False)
    engine.add_schema(gap_schema(tok, args.doc_tokens))
    rows = [measure_case(engine, label, case, sel, args) for case, sel in CASES.items()]
    print(table(rows, COLUMNS), flush=True)
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="llama,falcon,mpt", help="built-in random-weight models (comma-separated)")
    p.add_argument("--model", help="a local checkpoint directory (overrides --models)")
    p.add_argument("--hidden-size", type=int, default=256, help="built-in model width")
    p.add_argument("--layers", type=int, default=4, help="built-in model depth")
    p.add_argument("--doc-tokens", type=int, default=256, help="tokens per document module")
    p.add_argument("--questions", type=int, default=len(QUESTIONS), help=f"questions per case (<= {len(QUESTIONS)})")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="auto", help="auto (float32 on cpu, bfloat16 on cuda), float32, ...")
    p.add_argument("--quick", action="store_true", help="64-token documents, 3 questions, 8 new tokens")
    p.add_argument("--out", default="benchmarks/results", help="directory for gaps.json")
    p.add_argument("--name", default="gaps", help="file stem of the output")
    args = p.parse_args(argv)
    if args.quick:
        args.doc_tokens, args.questions = min(args.doc_tokens, 64), min(args.questions, 3)
        args.max_new_tokens = min(args.max_new_tokens, 8)
    if not 1 <= args.questions <= len(QUESTIONS):
        p.error(f"--questions must be 1..{len(QUESTIONS)}")
    args.models = [args.model] if args.model else [m.strip() for m in args.models.split(",") if m.strip()]
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    load_start = load_average()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(0)
    rows = []
    for name in args.models:
        rows += run_model(name, args, device, dtype)
    payload = result_payload("gaps", device, dtype, load_start, argv, rows)
    print(f"\nwrote {write_json(args.out, f'{args.name}.json', payload)}")
    return rows


if __name__ == "__main__":
    main()
