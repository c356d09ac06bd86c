"""promptcache against llama.cpp (llama-cpp-python) on the same GGUF, the same prompts, the same threads.

What a local user would run instead of us is llama.cpp. Both load one GGUF file (llama.cpp runs it
quantized; promptcache converts it once to a transformers checkpoint and runs it dequantized, in
each of `--dtypes`, one engine per dtype). For each context size, a document of about that many
tokens (the `inventory` package of the codegen schema, files repeated as needed) and a series of
distinct questions, and, timed round-robin in one run (warm-up excluded, medians):

- prefill_ms: the whole prompt, nothing cached (llama.cpp: `reset()` first; promptcache:
  `enable_cache=False`), one token generated.
- prefix_ms: the same document with a new question right after the previous one (llama.cpp keeps
  the previous prompt in its context and evaluates what follows the longest common prefix;
  promptcache's prefix cache and warm request blocks do the same).
- module_ms (promptcache only): the document as a PML module, a new question per request.
- decode_tps: tokens per second decoding `--decode-tokens` tokens after a cached prompt, EOS
  ignored: (n - 1) / (time(n tokens) - time(1 token)), both timed from the same cached state.
- agree_prefix / agree_module: after the timing, the share of `--agree` prompts whose
  `--decode-tokens` greedy tokens with the cache equal those without it (first_diff_*: the mean
  index of the first differing token; `--decode-tokens` when none differ).

Every call is a whole request through each library's public API, with the text as input (each side
tokenizes it); times are wall-clock milliseconds of the call.

    pip install llama-cpp-python            # benchmark-only; compiles llama.cpp (minutes)
    python benchmarks/peer.py               # contexts 1024, 3072, 7168; float32 and bfloat16
    python benchmarks/peer.py --quick       # context 1024, 2 repeats, 16 decoded tokens
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    REPO_ROOT,
    load_average,
    median,
    result_payload,
    table,
    time_interleaved,
    write_json,
)

SOURCES = REPO_ROOT / "schemas" / "code" / "inventory"
TARGETS = {"prefix_ratio": 1.0, "module_ratio": 1.0, "decode_ratio": 0.6, "prefill_speedup": 1.5}
COLUMNS = [("dtype", "dtype", ""), ("context_tokens", "context", "d"),
           ("llama_prefill_ms", "llama prefill ms", ".0f"), ("pc_prefill_ms", "pc prefill ms", ".0f"),
           ("prefill_speedup", "prefill x", ".2f"),
           ("llama_prefix_ms", "llama cached ms", ".1f"), ("pc_prefix_ms", "pc prefix ms", ".1f"),
           ("pc_module_ms", "pc module ms", ".1f"), ("prefix_ratio", "prefix/llama", ".2f"),
           ("module_ratio", "module/llama", ".2f"),
           ("llama_decode_tps", "llama tok/s", ".1f"), ("pc_decode_tps", "pc tok/s", ".1f"),
           ("decode_ratio", "decode x", ".2f"), ("agree_prefix", "agree prefix", ".2f"),
           ("agree_module", "agree module", ".2f")]


def document(tokenizer, n_tokens: int) -> str:
    """Whole lines of the inventory package's files (repeated with a copy number) up to ~`n_tokens`."""
    files = sorted(SOURCES.glob("*.py"))
    lines: list[str] = []
    for copy in itertools.count(1):
        for f in files:
            lines.append(f"# ---- inventory/{f.name} (copy {copy}) ----")
            lines.extend(f.read_text().splitlines())
        if len(tokenizer(("\n".join(lines)), add_special_tokens=False).input_ids) >= n_tokens:
            break
    lo, hi = 1, len(lines)  # the most lines that fit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        fits = len(tokenizer("\n".join(lines[:mid]), add_special_tokens=False).input_ids) <= n_tokens
        lo, hi = (mid, hi) if fits else (lo, mid - 1)
    return "\n".join(lines[:lo])


_TOPICS = ("the store", "a query", "the report", "an item", "the models", "stock levels", "prices",
           "the tests", "errors", "the package")
_ASKS = ("What would you change about", "Explain briefly how the code handles", "Which function deals with",
         "Name one bug risk in", "How would you test", "Summarise in one line")


def questions(n: int) -> list[str]:
    """`n` distinct short questions (different first words, so a common prefix stays short)."""
    pairs = itertools.product(_ASKS, _TOPICS)
    return [f"\n\n{ask} {topic}? ({i})\nAnswer:" for i, (ask, topic) in zip(range(n), itertools.cycle(pairs))]


def pml(name: str, doc: str, question: str) -> tuple[str, str]:
    """(schema, prompt): the document as one module, the question after it."""
    assert "]]>" not in doc
    schema = f'<schema name="{name}"><module name="doc"><![CDATA[{doc}]]></module></schema>'
    q = question.replace("&", "&amp;").replace("<", "&lt;")
    return schema, f'<prompt schema="{name}"><doc/>{q}</prompt>'


class Peer:
    """llama-cpp-python on the GGUF: one context (a slot) whose states persist between calls."""

    def __init__(self, gguf: Path, threads: int, n_ctx: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                         seed=0, verbose=False)

    def first_token(self, text: str) -> str:
        return self.llm.create_completion(text, max_tokens=1, temperature=0.0)["choices"][0]["text"]

    def decode(self, text: str, n: int) -> list[int]:
        """`n` greedy tokens, EOS not special (`Llama.generate` reuses the longest common prefix)."""
        tokens = self.llm.tokenize(text.encode("utf-8"), special=True)
        return [t for t, _ in zip(self.llm.generate(tokens, temp=0.0), range(n))]

    def count(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode("utf-8"), special=True))


class Rotation:
    """Hands out the next question index; `setup` runs the previous one so that it is what is cached."""

    def __init__(self, run, prompts: list[str]):
        self.run, self.prompts, self.i = run, prompts, 0

    def setup(self) -> None:
        self.i += 1
        self.run(self.prompts[self.i - 1])

    def timed(self) -> None:
        self.run(self.prompts[self.i])


def pc_settings(engine, tag: str, plain: list[str], modular: list[str], n: int) -> dict:
    """promptcache's timed settings (name -> fn or (fn, setup)), names prefixed with `tag`."""
    def pc(prompt, tokens=1, cache=True):
        return engine.generate(prompt, max_new_tokens=tokens, enable_cache=cache, ignore_eos=True)

    prefix, module, fixed = Rotation(pc, plain), Rotation(pc, modular), plain[-1]
    return {f"{tag}prefill": lambda: pc(plain[0], cache=False), f"{tag}prefix": (prefix.timed, prefix.setup),
            f"{tag}module": (module.timed, module.setup), f"{tag}t1": (lambda: pc(fixed, 1), lambda: pc(fixed, 1)),
            f"{tag}tn": (lambda: pc(fixed, n), lambda: pc(fixed, 1))}


def agreement(engine, prompts: list[str], other: str, n: int) -> tuple[float, float]:
    """(share of prompts whose `n` greedy tokens equal the uncached ones, mean index of the first difference).

    Each prompt runs cached right after `other` (the same document, another question), as in the timing.
    """
    same, first = 0, []
    for prompt in prompts:
        ref = engine.generate(prompt, max_new_tokens=n, ignore_eos=True, enable_cache=False).token_ids
        engine.generate(other, max_new_tokens=1)
        got = engine.generate(prompt, max_new_tokens=n, ignore_eos=True).token_ids
        k = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), n)
        same += k == n
        first.append(k)
    return same / len(prompts), sum(first) / len(first)


def measure(engines: dict, peer: Peer, context: int, args) -> list[dict]:
    """One row per promptcache dtype at this context; llama.cpp timed once, in the same round-robin."""
    tok = next(iter(engines.values())).tokenizer
    doc = document(tok, context)
    qs = questions(2 * (args.repeat + 2) + args.agree + 2)
    plain, name, n = [doc + q for q in qs], f"peer{context}", args.decode_tokens
    schema = pml(name, doc, qs[0])[0]
    modular = [pml(name, doc, q)[1] for q in qs]
    llama_prefix, fixed = Rotation(peer.first_token, plain), plain[-1]
    settings = {"llama_prefill": (lambda: peer.first_token(plain[0]), peer.llm.reset),
                "llama_prefix": (llama_prefix.timed, llama_prefix.setup),
                "llama_t1": (lambda: peer.decode(fixed, 1), lambda: peer.decode(fixed, 1)),
                "llama_tn": (lambda: peer.decode(fixed, n), lambda: peer.decode(fixed, 1))}
    for dtype, engine in engines.items():
        engine.add_schema(schema)
        settings.update(pc_settings(engine, f"{dtype}:", plain, modular, n))
    t = {k: median(v) for k, v in time_interleaved(settings, "cpu", repeat=args.repeat).items()}
    rows = []
    for dtype, engine in engines.items():
        row = {"dtype": dtype, "context_tokens": len(engine.plan(plain[0]).token_ids),
               "llama_context_tokens": peer.count(plain[0]),
               "module_context_tokens": len(engine.plan(modular[0]).token_ids),
               "llama_prefill_ms": t["llama_prefill"], "pc_prefill_ms": t[f"{dtype}:prefill"],
               "llama_prefix_ms": t["llama_prefix"], "pc_prefix_ms": t[f"{dtype}:prefix"],
               "pc_module_ms": t[f"{dtype}:module"],
               "llama_decode_tps": (n - 1) / max(1e-9, (t["llama_tn"] - t["llama_t1"]) / 1e3),
               "pc_decode_tps": (n - 1) / max(1e-9, (t[f"{dtype}:tn"] - t[f"{dtype}:t1"]) / 1e3),
               "repeat": args.repeat, "decode_tokens": n}
        row["prefill_speedup"] = row["llama_prefill_ms"] / row["pc_prefill_ms"]
        row["prefix_ratio"] = row["pc_prefix_ms"] / row["llama_prefix_ms"]
        row["module_ratio"] = row["pc_module_ms"] / row["llama_prefix_ms"]
        row["decode_ratio"] = row["pc_decode_tps"] / row["llama_decode_tps"]
        if args.agree:
            asked = slice(len(qs) - args.agree - 1, len(qs) - 1)
            row["agree_prefix"], row["first_diff_prefix"] = agreement(engine, plain[asked], plain[0], n)
            row["agree_module"], row["first_diff_module"] = agreement(engine, modular[asked], modular[0], n)
        engine.remove_schema(name)
        rows.append(row)
    return rows


def verdicts(rows: list[dict]) -> dict[str, dict[str, bool]]:
    """Per dtype: each target met at every context? (cached TTFT ratios at most 1, the others at least their floor)"""
    out: dict[str, dict[str, bool]] = {}
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        mine = [r for r in rows if r["dtype"] == dtype]
        out[dtype] = {key: all((r[key] <= bound) if key in ("prefix_ratio", "module_ratio") else (r[key] >= bound)
                               for r in mine) for key, bound in TARGETS.items()}
    return out


def engine_for(engine_cls, gguf: Path, spec: str):
    """An engine for one `--dtypes` entry: a dtype ("float32", "bfloat16") and options after "+":
    "int8" (`Engine(int8_decode=True)`), "compiled" (`Engine(compile_decode=True)`, both compiled steps
    compiled here by a short warm-up, outside the timing); e.g. "bfloat16+int8"."""
    dtype, *options = spec.split("+")
    unknown = sorted(set(options) - {"int8", "compiled"})
    if unknown:
        raise SystemExit(f"--dtypes entry {spec!r}: unknown option(s) {', '.join(unknown)}; valid: int8, compiled")
    engine = engine_cls.from_pretrained(str(gguf), device="cpu", dtype=dtype, progress=False,
                                        compile_decode="compiled" in options, int8_decode="int8" in options)
    if "compiled" in options:
        engine.warm_up()
        steps = engine.adapter.compiled
        print(f"{spec}: compiled the few-token step in {steps.compile_few_s:.0f} s, the one-token step in "
              f"{steps.compile_s:.0f} s", flush=True)
    return engine


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from promptcache.models.load import builtin_gguf

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", default=None, help="GGUF file (default: the built-in smollm2-135m-instruct)")
    p.add_argument("--contexts", default="1024,3072,7168", help="document sizes in tokens")
    p.add_argument("--repeat", type=int, default=5, help="timed repetitions per setting (median taken)")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens decoded for tokens/s")
    p.add_argument("--threads", type=int, default=2, help="CPU threads, both libraries")
    p.add_argument("--dtypes", default="float32,bfloat16",
                   help="promptcache engines: DTYPE[+int8][+compiled], comma-separated")
    p.add_argument("--agree", type=int, default=3,
                   help="prompts per context whose cached and uncached greedy tokens are compared (0: none)")
    p.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    p.add_argument("--quick", action="store_true", help="context 1024, 2 repeats, 16 decoded tokens")
    p.add_argument("--out", default="benchmarks/results", help="output directory")
    p.add_argument("--name", default="peer", help="file stem of the JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.repeat = min(args.repeat, 2)
        args.decode_tokens = min(args.decode_tokens, 16)
        args.agree = min(args.agree, 1)
        if args.contexts == p.get_default("contexts"):
            args.contexts = "1024"
    args.contexts = [int(c) for c in args.contexts.split(",")]
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    args.gguf = Path(args.gguf) if args.gguf else builtin_gguf("smollm2-135m-instruct")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("llama-cpp-python is not installed: pip install llama-cpp-python") from None
    from promptcache.engine.engine import Engine

    load_start = load_average()
    torch.set_num_threads(args.threads)
    engines = {spec: engine_for(Engine, args.gguf, spec) for spec in args.dtypes}
    max_positions = next(iter(engines.values())).adapter.max_positions
    peer = Peer(args.gguf, args.threads, n_ctx=min(max_positions, max(args.contexts) + 512))
    rows = []
    for context in args.contexts:
        rows += measure(engines, peer, context, args)
        print(table(rows[-len(engines):], COLUMNS), flush=True)
    print()
    print(table(rows, COLUMNS))
    met = verdicts(rows)
    for dtype, targets in met.items():
        for key, ok in targets.items():
            values = ", ".join(f"{r[key]:.2f}" for r in rows if r["dtype"] == dtype)
            bound = "<=" if key in ("prefix_ratio", "module_ratio") else ">="
            print(f"{dtype}: target {key} {bound} {TARGETS[key]}: {'met' if ok else 'NOT met'} ({values})")
    payload = result_payload("peer", torch.device("cpu"), "/".join(args.dtypes), load_start, argv, rows,
                             peer={"library": "llama-cpp-python", "version": llama_cpp.__version__,
                                   "gguf": args.gguf.name, "threads": args.threads},
                             targets=TARGETS, met=met, note=args.note)
    path = write_json(args.out, f"{args.name}.json", payload)
    print(f"\nwrote {path}")
    return rows


if __name__ == "__main__":
    main()
