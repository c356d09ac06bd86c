"""The quality suite: its task set, its metric, and its runners end to end on a tiny model (--quick)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from benchmarks import docqa, quality, recompute
from benchmarks.data.docqa import make_docqa
from benchmarks.metrics import contains_answer
from benchmarks.scorers import default_scorer_path

from .test_scorers import tiny_checkpoint

ROW_FIELDS = {"setup", "rule", "fraction", "n", "recomputed", "acc_full", "acc_cached", "agreement",
              "first_token_agreement", "mean_kl"}
SEMANTIC = {"semantic_agreement", "semantic_full", "semantic_cached"}


def test_docqa_task_set_is_shipped_as_generated():
    shipped = docqa.load_docqa()
    assert shipped == json.loads(json.dumps(make_docqa.task_set()))


def test_docqa_answers_are_in_their_document_only():
    tasks = docqa.load_docqa()
    questions = [q for g in tasks["groups"] for q in g["questions"]]
    assert len(questions) >= 100 and len({q["style"] for q in questions}) >= 4
    assert len({q["id"] for q in questions}) == len(questions)
    for group in tasks["groups"]:
        texts = {d["name"]: d["text"] for d in group["documents"]}
        for q in group["questions"]:
            answer = q["answers"][0]
            assert contains_answer(texts[q["doc"]], answer), q
            assert not any(contains_answer(t, answer) for n, t in texts.items() if n != q["doc"]), q


def test_contains_answer_needs_whole_words():
    assert contains_answer("Maria Holm founded it in 1998.", "maria holm") == 1.0
    assert contains_answer("It has 13 lamps.", "3") == 0.0
    assert contains_answer("It has 3 lamps.", "3") == 1.0
    assert contains_answer("anything", "") == 0.0


def test_setups_select_as_documented():
    engine = quality.load_engine("llama", "cpu", __import__("torch").float32, None)[0]
    tasks = docqa.load_docqa()
    tasks["groups"] = tasks["groups"][:1]
    for setup in docqa.DOCQA_SETUPS:
        cases = docqa.docqa_cases(engine, setup, tasks, per_group=4)
        for case in cases:  # exact: nothing stale; the others: stale spliced states to recompute
            if setup == "retrieved":  # stale only where a skipped document comes before a retrieved one
                assert len(engine.plan(case.prompt).retrieved) == docqa.RETRIEVE_K
                continue
            with engine.prefill(engine.plan(case.prompt), recompute=1.0) as pre:
                assert (pre.recomputed_tokens == 0) == (setup == "exact"), (setup, case.id)
        plans = [engine.plan(c.prompt).tokens for c in cases]
        if setup == "exact":
            assert all(p.positions == tuple(range(len(p.token_ids))) for p in plans)
        if setup == "skipped":
            assert all(sum(m.startswith("d") for m in p.modules) == 2 for p in plans)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    rows = quality.main(["--quick", "--model", "llama", "--out", str(out), "--keep-outputs"])
    return rows, json.loads((out / "quality.json").read_text())


def test_quick_run_covers_every_setup(quick):
    rows, payload = quick
    assert {r["setup"] for r in rows} == set(docqa.SETUPS)
    assert payload["hardware"] and payload["model"].startswith("llama") and payload["rows"] == rows
    scored = default_scorer_path() is not None
    for row in rows:
        assert ROW_FIELDS <= set(row) and (SEMANTIC <= set(row)) == scored, row
        assert 0 <= row["agreement"] <= 1 and 0 <= row["acc_cached"] <= 100 and row["mean_kl"] >= 0
        assert row["n"] == len(row["outputs"]) > 0
    assert set(payload["targets"]) == set(docqa.SETUPS) - set(docqa.EXACT_SETUPS)


def test_quick_run_exact_setups_agree_and_full_recompute_agrees(quick):
    rows, payload = quick
    assert payload["exact_setups_agree"] is True
    for row in rows:
        if row["setup"] in docqa.EXACT_SETUPS:
            assert row["agreement"] == 1.0 and row["recomputed"] == 0.0, row
        elif row["fraction"] == 1.0:  # every stale token recomputed: the full prefill
            assert row["agreement"] == 1.0 and row["first_token_agreement"] == 1.0, row
            assert row["mean_kl"] < 1e-6 and 0 < row["recomputed"] <= 1
        elif row["fraction"] == 0.0:
            assert row["recomputed"] == 0.0
        if SEMANTIC <= set(row) and row["agreement"] == 1.0:
            assert row["semantic_agreement"] == pytest.approx(1.0, abs=1e-4)
    stale = [r for r in rows if r["setup"] not in docqa.EXACT_SETUPS and r["fraction"] == 0.0]
    assert min(r["agreement"] for r in stale) < 1.0, "splicing as stored agreed everywhere: nothing was measured"


def test_quick_run_with_another_scorer(tmp_path):
    scorer = tiny_checkpoint(tmp_path / "scorer", num_labels=None)
    rows = quality.main(["--quick", "--model", "mpt", "--setups", "union", "--fractions", "0,1", "--scorer", scorer,
                         "--rules", "leading", "--out", str(tmp_path)])
    assert [(r["rule"], r["fraction"]) for r in rows] == [("-", 0.0), ("leading", 1.0)]
    assert all(SEMANTIC <= set(r) for r in rows)


def test_the_document_oracle_runs_on_docqa_only_and_meets_no_target(tmp_path):
    rows = quality.main(["--quick", "--model", "llama", "--setups", "skipped,longbench-multi", "--fractions", "0,0.5",
                         "--rules", "first,document", "--no-scorer", "--out", str(tmp_path)])
    assert [(r["setup"], r["rule"]) for r in rows] == [("skipped", "-"), ("skipped", "first"), ("skipped", "document"),
                                                       ("longbench-multi", "-"), ("longbench-multi", "first")]
    oracle = rows[2] | {"fraction": 0.2, "agreement": 1.0, "acc_cached": rows[2]["acc_full"]}
    assert quality.targets([oracle]) == {"skipped": None}
    assert quality.targets([oracle | {"rule": "first"}])["skipped"]["rule"] == "first"


@pytest.mark.parametrize("argv", [["--fractions", "1.5"], ["--rules", "bogus"], ["--setups", "nope"]])
def test_bad_arguments_exit(argv, tmp_path):
    with pytest.raises(SystemExit):
        quality.main(["--quick", "--model", "llama", "--out", str(tmp_path), *argv])


def test_recompute_ttft_runner(tmp_path):
    quality_json = tmp_path / "q.json"
    quality_json.write_text(json.dumps({"model": "m", "rows": [
        {"setup": "union", "rule": r, "fraction": f, "agreement": a}
        for r, f, a in (("-", 0.0, 0.5), ("first", 0.15, 0.7), ("first", 1.0, 1.0))]}))
    rows = recompute.main(["--quick", "--model", "llama", "--out", str(tmp_path), "--quality", str(quality_json)])
    assert [r["fraction"] for r in rows] == [0.0, 0.15, 1.0, None]  # None: the full prefill's own runs
    assert all(len(r["runs_ms"]["wall"]) == len(r["runs_ms"]["cpu"]) == 1 for r in rows)
    rows = rows[:-1]
    assert rows[0]["recomputed_tokens"] == 0 < rows[1]["recomputed_tokens"] < rows[2]["recomputed_tokens"]
    assert rows[2]["recomputed_tokens"] <= rows[2]["spliced_tokens"] < rows[2]["context_tokens"]
    assert all(r["ttft_ms"] > 0 and r["ttft_cpu_ms"] > 0 and r["speedup"] > 0 for r in rows)
    assert (tmp_path / "recompute.png").exists() == (importlib.util.find_spec("matplotlib") is not None)


def test_recompute_runner_times_a_kept_full_recompute(tmp_path):
    rows = recompute.main(["--quick", "--model", "llama", "--kept", "--out", str(tmp_path)])
    assert [(r["fraction"], r["rule"]) for r in rows][-3:] == [(1.0, "first"), (None, "full prefill"),
                                                              (None, "full recompute, kept")]
    kept = rows[-1]
    assert kept["recomputed_tokens"] == 0 and kept["cached_tokens"] == kept["context_tokens"] - 1
    assert rows[-3]["recomputed_tokens"] > 0 and kept["ttft_cpu_ms"] > 0 and kept["speedup"] > 0


def test_replot_draws_the_plot_again_from_a_saved_result_and_several_quality_files(tmp_path):
    first, bounds = tmp_path / "q.json", tmp_path / "bounds.json"
    first.write_text(json.dumps({"model": "m", "rows": [{"setup": "union", "rule": r, "fraction": f, "agreement": a}
                                                        for r, f, a in (("-", 0.0, 0.5), ("first", 0.2, 0.7),
                                                                        ("first", 1.0, 1.0))]}))
    bounds.write_text(json.dumps({"model": "m", "rows": [{"setup": "union", "rule": "oracle", "fraction": f,
                                                          "agreement": a} for f, a in ((0.2, 0.8), (0.5, 0.9))]}))
    merged = recompute.load_quality(f"{first},{bounds}")
    assert merged["model"] == "m" and [r["rule"] for r in merged["rows"]] == ["-", "first", "first", "oracle", "oracle"]
    timed = recompute.main(["--quick", "--model", "llama", "--out", str(tmp_path), "--name", "r"])
    png = tmp_path / "r.png"
    png.unlink(missing_ok=True)
    replotted = recompute.main(["--replot", str(tmp_path / "r.json"), "--quality", f"{first},{bounds}"])
    assert replotted == json.loads(json.dumps(timed))  # the saved rows, nothing timed again
    assert png.exists() == (importlib.util.find_spec("matplotlib") is not None)
