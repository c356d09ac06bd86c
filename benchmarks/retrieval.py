"""Retrieval over modules: is the right document among the k the engine retrieves for a question?

Two shipped sets, each a schema whose documents are modules and questions labelled with the document
that answers them:
- kb: `schemas/kb.xml` (8 documents of a town's services) and `data/retrieval/kb_questions.jsonl`
  (53 questions, English and Korean, phrased without the documents' titles where possible);
- docqa: the 32 documents of `data/docqa/docqa.json` as one schema, its 128 questions (English).

Questions go through `Engine.retrieve` (module embeddings computed at `add_schema`), for each embedder:

    python benchmarks/retrieval.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import load_average, table, versions, write_json  # noqa: E402
from benchmarks.docqa import _modules, _schema, load_docqa  # noqa: E402
from promptcache.embeddings import EMBEDDERS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KB_QUESTIONS = Path(__file__).parent / "data" / "retrieval" / "kb_questions.jsonl"


def kb_set() -> tuple[str, list[dict]]:
    schema = (ROOT / "schemas" / "kb.xml").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in KB_QUESTIONS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return schema, rows


def docqa_set() -> tuple[str, list[dict]]:
    tasks = load_docqa()
    docs = [{**d, "name": f"{g['id']}-{d['name']}"} for g in tasks["groups"] for d in g["documents"]]
    rows = [{"schema": "docqa_all", "doc": f"{g['id']}-{q['doc']}", "lang": "en", "question": q["question"]}
            for g in tasks["groups"] for q in g["questions"]]
    return _schema("docqa_all", tasks["system"], _modules(docs)), rows


def evaluate(engine, schema: str, rows: list[dict], k: int = 3) -> list[dict]:
    """Top-1 and top-k accuracy per language ("all" too), and the questions missed at k."""
    engine.add_schema(schema)
    hits = []
    for row in rows:
        names = engine.retrieve(row["schema"], row["question"], k=k)
        hits.append((row, names))
    out = []
    for lang in ["all", *sorted({r["lang"] for r in rows})]:
        sub = [(r, n) for r, n in hits if lang in ("all", r["lang"])]
        out.append({"lang": lang, "questions": len(sub), "top1": sum(n[0] == r["doc"] for r, n in sub) / len(sub),
                    f"top{k}": sum(r["doc"] in n for r, n in sub) / len(sub),
                    "missed": [{"question": r["question"], "doc": r["doc"], "retrieved": n}
                               for r, n in sub if r["doc"] not in n]})
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="the engine's model (its tokenizer "
                    "decodes the module text that is embedded); 'tiny' for a quick run")
    ap.add_argument("--embedders", default=",".join(EMBEDDERS))
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--out", default=None, help="write retrieval.json to this directory")
    args = ap.parse_args(argv)
    from promptcache import Engine

    results = []
    for name in args.embedders.split(","):
        engine = Engine.from_pretrained(args.model, device="cpu", embedder=name, progress=False)
        for set_name, (schema, rows) in {"kb": kb_set(), "docqa": docqa_set()}.items():
            for r in evaluate(engine, schema, rows, args.k):
                results.append({"embedder": name, "set": set_name, **r})
    print(table(results, [("embedder", "embedder", ""), ("set", "set", ""), ("lang", "lang", ""),
                          ("questions", "questions", "d"), ("top1", "top-1", ".3f"),
                          (f"top{args.k}", f"top-{args.k}", ".3f")]))
    if args.out:
        payload = {"benchmark": "retrieval", "model": args.model, "k": args.k, "load_average": load_average(),
                   "versions": versions(), "results": results}
        print(f"wrote {write_json(args.out, 'retrieval.json', payload)}")
    return results


if __name__ == "__main__":
    main()
