"""Smoke tests: the benchmark scripts run end to end on tiny shapes and write their JSON.

Speed is never asserted here (benchmarks/ measures it); only that the runners work and that the
exact setup agrees.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from benchmarks import gaps, ttft

TTFT_FIELDS = {"model", "device", "context_tokens", "new_tokens", "ttft_no_cache_ms", "ttft_cache_ms",
               "ttft_ideal_ms", "speedup", "encode_ms", "splice_ms", "tpot_ms", "kv_bytes_per_token",
               "ttft_cache_host_ms", "ttft_ideal_dynamic_ms"}


@pytest.mark.parametrize("models", ["llama", "falcon,mpt", "mistral,qwen2"])
def test_ttft_runner(tmp_path, models):
    rows = ttft.main(["--quick", "--models", models, "--contexts", "48,96", "--hidden-size", "64",
                      "--layers", "2", "--repeat", "1", "--decode-tokens", "2", "--out", str(tmp_path)])
    assert len(rows) == 2 * len(models.split(","))
    payload = json.loads((tmp_path / "ttft.json").read_text())
    assert payload["hardware"] and payload["versions"]["torch"]
    for row in payload["rows"]:
        assert TTFT_FIELDS <= set(row)
        assert 40 <= row["context_tokens"] <= 100 and row["new_tokens"] > 0
        assert row["ttft_cache_ms"] > 0 and row["kv_bytes_per_token"] > 0
        assert row["ideal_max_abs_logit_diff"] < 1e-3  # the ideal computes what the engine computes
    # The plot is optional (matplotlib is the `plot` extra, not a test dependency).
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    assert (tmp_path / "ttft.png").exists() == has_matplotlib


def test_ttft_rejects_unknown_model(tmp_path):
    with pytest.raises(SystemExit):
        ttft.main(["--models", "gpt9", "--contexts", "32", "--out", str(tmp_path)])


def test_gaps_runner(tmp_path):
    rows = gaps.main(["--quick", "--models", "llama,mpt", "--hidden-size", "64", "--layers", "2",
                      "--doc-tokens", "24", "--questions", "2", "--max-new-tokens", "4", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "gaps.json").read_text())
    assert [(r["model"].split("-")[0], r["case"]) for r in payload["rows"]] == [
        (m, c) for m in ("llama", "mpt") for c in ("exact", "skipped", "union", "parameter")]
    for row in rows:
        assert row["n"] == 2 and 0 <= row["top1_agreement"] <= 1 and row["mean_kl"] >= -1e-6
        if row["case"] == "exact":  # the control: cached is the full prefill
            assert row["agreement"] == 1.0 and row["top1_agreement"] == 1.0 and row["max_abs_logit_diff"] < 1e-3
        else:  # position gaps and stale context change the logits (never bit-identical)
            assert row["max_abs_logit_diff"] > 1e-4


def test_threads_runner(tmp_path, monkeypatch):
    import torch

    from benchmarks import threads

    monkeypatch.setenv("PROMPTCACHE_CACHE_DIR", str(tmp_path / "cache"))
    before = torch.get_num_threads()
    try:
        assert threads.main(["--model", "tiny", "--quick", "--conditions", "loaded,as-is", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(before)
    (result,) = tmp_path.glob("threads-tiny-*.json")
    rows = json.loads(result.read_text())["rows"]
    assert [(r["condition"], r["setting"]) for r in rows] == [
        (c, s) for c in ("loaded", "as-is") for s in ("1 thread", "torch default", "auto")]
    assert all(r["cached_ttft_ms"] > 0 and r["threads"] >= 1 for r in rows)
    assert rows[0]["cached_vs_one"] == 1.0


def test_batching_runner(tmp_path):
    from benchmarks import batching

    payload = batching.main(["--model", "tiny", "--widths", "1,3", "--chunks", "16", "--long-tokens", "96",
                             "--steps", "3", "--streams", "2", "--threads", "1", "--out", str(tmp_path), "--name", "b"])
    assert json.loads((tmp_path / "b.json").read_text())["rows"] == payload["rows"]
    assert [r["width"] for r in payload["rows"]] == [1, 3]
    assert all(r["step_ms"] > 0 and r["tokens_per_s"] > 0 for r in payload["rows"])
    (chunk,) = payload["chunks"]
    assert chunk["prefill_chunk"] == 16 and chunk["steps_during"] >= 96 // 16  # the long prompt ran in chunks
