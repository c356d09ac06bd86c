"""Semantic response reuse: precision and recall of "these two requests are one" per language and model.

Reads the labelled pairs in `data/semantic/pairs.jsonl` (paraphrases, and near misses that change an
entity, a number, a unit, a negation or the intent), embeds each side's normalised text
(`promptcache.normalize.normalize_text`) and calls a pair "reused" when its cosine similarity is at least
the threshold (and, with guards, when `guards_agree` too), as the engine does. Pairs with a text the
model does not read in full (`Embedder.covers`) are never reused, as in the engine. A false reuse is a
near miss answered with the other request's answer: precision counts them, recall counts the paraphrases
answered from the cache.

For each model and guard setting it reports the lowest threshold with no false reuse on the whole set
(the engine's default comes from there), writes the results JSON and a plot:

    python benchmarks/semantic.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import load_average, table, versions, write_json  # noqa: E402
from promptcache.embeddings import (  # noqa: E402
    EMBEDDERS,
    UseEmbedder,  # noqa: E402
    load_embedder,
)
from promptcache.normalize import guards_agree, normalize_text  # noqa: E402
from promptcache.response_match import DEFAULT_THRESHOLDS  # noqa: E402

DATA = Path(__file__).parent / "data" / "semantic" / "pairs.jsonl"
THRESHOLDS = [round(0.60 + 0.01 * i, 2) for i in range(40)]  # 0.60 .. 0.99


def load_pairs(path: Path = DATA) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def similarities(pairs: list[dict], model: str) -> list[float | None]:
    """Cosine similarity of each pair's normalised texts under `model`; None where the model does not read
    all of a text (`Embedder.covers`: all-MiniLM-L6-v2 reads most Korean as unknown tokens), which the
    engine never matches by meaning."""
    embedder = load_embedder(model)
    a = embedder.embed([normalize_text(p["a"]) for p in pairs])
    b = embedder.embed([normalize_text(p["b"]) for p in pairs])
    sims = (a * b).sum(-1).tolist()
    return [s if embedder.covers(p["a"]) and embedder.covers(p["b"]) else None for s, p in zip(sims, pairs)]


def scores(pairs: list[dict], sims: list[float], guarded: bool, threshold: float) -> dict:
    """Precision, recall and the false reuses (with their kinds) at one threshold."""
    reused = [s is not None and s >= threshold and (not guarded or guards_agree(p["a"], p["b"]))
              for p, s in zip(pairs, sims)]
    tp = sum(r and p["same"] for r, p in zip(reused, pairs))
    fp = [p for r, p in zip(reused, pairs) if r and not p["same"]]
    positives = sum(p["same"] for p in pairs)
    return {"threshold": threshold, "precision": tp / (tp + len(fp)) if tp + len(fp) else 1.0,
            "recall": tp / positives if positives else 0.0, "false_reuse": len(fp),
            "false_kinds": sorted({p["kind"] for p in fp})}


def safe_threshold(rows: list[dict]) -> float | None:
    """The lowest threshold from which on no threshold gives a false reuse."""
    safe = None
    for row in sorted(rows, key=lambda r: -r["threshold"]):
        if row["false_reuse"]:
            break
        safe = row["threshold"]
    return safe


def evaluate(pairs: list[dict], models: list[str]) -> list[dict]:
    """One result per (model, guards, language): the rows at every threshold and the safe threshold."""
    results = []
    for model in models:
        sims = similarities(pairs, model)
        for guarded in (False, True):
            for lang in ["all", *sorted({p["lang"] for p in pairs})]:
                idx = [i for i, p in enumerate(pairs) if lang in ("all", p["lang"])]
                sub, sub_sims = [pairs[i] for i in idx], [sims[i] for i in idx]
                rows = [scores(sub, sub_sims, guarded, t) for t in THRESHOLDS]
                safe = safe_threshold(rows)
                at_safe = next((r for r in rows if r["threshold"] == safe), None)
                results.append({"model": model, "guards": guarded, "lang": lang, "pairs": len(sub),
                                "near_misses": sum(not p["same"] for p in sub),
                                "safe_threshold": safe, "recall_at_safe": at_safe and at_safe["recall"],
                                "rows": rows})
    return results


def plot(results: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    langs = [lang for lang in dict.fromkeys(r["lang"] for r in results) if lang != "all"]
    fig, axes = plt.subplots(1, len(langs), figsize=(5.5 * len(langs), 4.2), squeeze=False)
    for ax, lang in zip(axes[0], langs):
        for r in (r for r in results if r["lang"] == lang):
            xs = [row["threshold"] for row in r["rows"]]
            style = "-" if r["guards"] else ":"
            label = f"{r['model']}{' + guards' if r['guards'] else ''}"
            line, = ax.plot(xs, [row["recall"] for row in r["rows"]], style, label=f"{label}: recall")
            ax.plot(xs, [row["false_reuse"] / r["near_misses"] for row in r["rows"]], style,
                    color=line.get_color(), alpha=0.35)
        ax.axvline(DEFAULT_THRESHOLDS[UseEmbedder.identity], color="grey", lw=0.8, ls="--")
        ax.set_title(f"{lang}: recall (dark), near misses reused (light); dashed: default")
        ax.set_xlabel("cosine threshold")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(EMBEDDERS), help=f"comma-separated, of {', '.join(EMBEDDERS)}")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--out", default=None, help="write the results JSON and the plot to this directory")
    args = ap.parse_args(argv)
    pairs = load_pairs(Path(args.data))
    results = evaluate(pairs, args.models.split(","))
    summary = [{k: r[k] for k in ("model", "guards", "lang", "pairs", "safe_threshold", "recall_at_safe")}
               for r in results]
    print(table(summary, [("model", "model", ""), ("guards", "guards", ""), ("lang", "lang", ""),
                          ("pairs", "pairs", "d"), ("safe_threshold", "no false reuse from", ".2f"),
                          ("recall_at_safe", "recall there", ".3f")]))
    if args.out:
        payload = {"benchmark": "semantic", "data": Path(args.data).name, "pairs": len(pairs),
                   "load_average": load_average(), "versions": versions(), "results": results}
        path = write_json(args.out, "semantic-reuse.json", payload)
        png = plot(results, Path(args.out) / "semantic-reuse.png")
        print(f"wrote {path}" + (f" and {png}" if png else " (no plot: pip install matplotlib)"))
    return results


if __name__ == "__main__":
    main()
