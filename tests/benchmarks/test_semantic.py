"""benchmarks/semantic.py: the shipped labelled set and the precision/recall arithmetic."""

from __future__ import annotations

from collections import Counter

from benchmarks.semantic import load_pairs, safe_threshold, scores


def test_the_shipped_set_covers_both_languages_and_every_kind_of_near_miss():
    pairs = load_pairs()
    assert len(pairs) >= 200
    for lang in ("en", "ko"):
        kinds = Counter(p["kind"] for p in pairs if p["lang"] == lang)
        assert set(kinds) == {"paraphrase", "entity", "number", "unit", "negation", "intent"}
        assert kinds["paraphrase"] >= 50
    assert all(p["same"] == (p["kind"] == "paraphrase") for p in pairs)


def test_scores_and_the_safe_threshold():
    pairs = [{"a": "x", "b": "y", "same": True, "kind": "paraphrase"},
             {"a": "x", "b": "z", "same": True, "kind": "paraphrase"},
             {"a": "x", "b": "w", "same": False, "kind": "entity"}]
    sims = [0.95, 0.80, 0.85]
    row = scores(pairs, sims, guarded=False, threshold=0.8)
    assert (row["precision"], row["recall"], row["false_reuse"], row["false_kinds"]) == (2 / 3, 1.0, 1, ["entity"])
    row = scores(pairs, [0.95, None, 0.85], guarded=False, threshold=0.8)  # None: not read, never reused
    assert (row["recall"], row["false_reuse"]) == (0.5, 1)
    rows = [scores(pairs, sims, False, t) for t in (0.8, 0.85, 0.9, 0.95)]
    assert safe_threshold(rows) == 0.9


def test_retrieval_sets_label_existing_documents():
    from benchmarks.retrieval import docqa_set, kb_set
    from promptcache.markup.parse import parse_schema

    for schema, rows in (kb_set(), docqa_set()):
        parsed = parse_schema(schema)
        names = {n.name for n in parsed.children if hasattr(n, "name")}
        names |= {m.name for n in parsed.children for m in getattr(n, "children", ()) if hasattr(m, "name")}
        assert rows and {r["doc"] for r in rows} <= names
        assert all(r["schema"] == parsed.name for r in rows)
    assert {r["lang"] for r in kb_set()[1]} == {"en", "ko"}
