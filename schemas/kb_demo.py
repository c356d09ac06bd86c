"""A knowledge base as modules: questions answered by retrieval, repeats and rephrasings from the cache.

`kb.xml` holds eight documents as modules. Each question goes out as
`<prompt schema="kb" retrieve="3"><user>question</user></prompt>`: the engine splices the three documents
nearest the question. The engine caches responses with `response_match="semantic"`: a repeated question,
the same one in other case and spacing, and a rephrasing close enough in meaning (and equal in numbers,
names, negation) are answered from the cache; a near miss ("red zone" for "blue zone") is computed.

    python schemas/kb_demo.py                       # SmolLM2-135M-Instruct on the CPU (~1 min)
    python schemas/kb_demo.py --model tiny          # a random-weight model: the mechanics only
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import unicodedata
from pathlib import Path
from xml.sax.saxutils import escape

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from promptcache import Engine  # noqa: E402

HERE = Path(__file__).resolve().parent
QUESTIONS = [
    "How much does a single swim cost?",
    "How much does a single swim cost?",  # repeated: the exact request
    "  how much does a SINGLE swim cost ",  # the same after clean-up
    "How much is a single swim?",  # rephrased
    "How long can visitors park in the blue zone?",
    "How long may visitors park in a blue zone?",  # rephrased
    "How long can visitors park in the red zone?",  # a near miss: computed
    "버스 월 정기권은 얼마예요?",  # Korean: "how much is a monthly bus pass?"
    "버스 월 정기권 얼마인가요?",  # rephrased
]


def prompt(question: str) -> str:
    return f'<prompt schema="kb" retrieve="3"><user>{escape(question)}</user></prompt>'


def usage_row(i: int, question: str, usage) -> dict:
    similarity = usage.response_similarity
    return {"#": str(i), "question": question.strip()[:46], "retrieved": ",".join(usage.modules_retrieved),
            "from cache": "yes" if usage.response_cached else "no",
            "similarity": "-" if similarity is None else f"{similarity:.3f}",
            "cached tok": f"{usage.cached_tokens}/{usage.input_tokens}", "ttft ms": f"{1000 * usage.ttft_s:.0f}"}


def width(text: str) -> int:
    """Terminal columns: Hangul and other wide characters take two."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def table(rows: list[dict]) -> str:
    heads = list(rows[0])
    widths = {h: max(width(h), *(width(r[h]) for r in rows)) for h in heads}

    def line(cells: dict) -> str:
        return "  ".join(cells[h] + " " * (widths[h] - width(cells[h])) for h in heads).rstrip()

    return "\n".join([line({h: h for h in heads}), line({h: "-" * widths[h] for h in heads}), *map(line, rows)])


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--cache-dir", help="the response cache (default: a fresh temporary directory)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine.from_pretrained(args.model, device="cpu", progress=False,
                                        response_cache_dir=args.cache_dir or tmp, response_match="semantic")
        engine.add_schema(HERE / "kb.xml")
        rows = []
        for i, question in enumerate(QUESTIONS, 1):
            out = engine.generate(prompt(question), max_new_tokens=args.max_new_tokens)
            print(f"{i}. {question.strip()}\n   -> {out.text.strip()}")
            rows.append(usage_row(i, question, out.usage))
    print()
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
