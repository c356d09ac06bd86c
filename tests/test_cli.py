"""The `promptcache` command line, run as `python -m promptcache` in a subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from promptcache.cli import main

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "schemas"
EXAMPLES = sorted(SCHEMAS.glob("*.xml"))
PERSONA = ["--schema", str(SCHEMAS / "persona.xml"), "--prompt", str(SCHEMAS / "persona.prompt.xml")]


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "promptcache", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=env)


@pytest.fixture
def cli_main(capsys, monkeypatch):
    """`promptcache` in this process (no second torch import: seconds, tens on a busy CPU), like `cli`."""
    import torch

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def run(*args: str) -> subprocess.CompletedProcess:
        code = main([*args, "--threads", str(torch.get_num_threads())])
        out = capsys.readouterr()
        return subprocess.CompletedProcess(["promptcache", *args], code, out.out, out.err)

    return run


@pytest.mark.parametrize("command", [[], ["validate"], ["run"], ["layout"]],
                         ids=lambda c: " ".join(c) or "top")
def test_help(command):
    out = cli(*command, "--help")
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout


def test_validate_every_example():
    assert EXAMPLES, "no example schemas found"
    out = cli("validate", *map(str, EXAMPLES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count(": OK") == len(EXAMPLES)


def test_validate_reports_file_line_column(tmp_path):
    bad = tmp_path / "broken.xml"
    bad.write_text('<schema name="s">\n  <module name="a">\n    <parameter name="p"/>\n'
                   '  </module>\n</schema>\n')
    good = SCHEMAS / "codegen.xml"
    out = cli("validate", str(good), str(bad))
    assert out.returncode == 1
    assert f"{good}: OK" in out.stdout
    assert re.search(re.escape(str(bad)) + r":3:\d+: \S", out.stdout), out.stdout
    assert "Traceback" not in out.stderr


def test_validate_missing_file(tmp_path):
    out = cli("validate", str(tmp_path / "nope.xml"))
    assert out.returncode == 1
    assert "nope.xml" in out.stdout
    assert "Traceback" not in out.stderr


def test_run_json():
    out = cli("run", *PERSONA, "--model", "tiny", "--max-new-tokens", "4", "--device", "cpu", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert isinstance(result["text"], str)
    usage = result["usage"]
    assert usage["input_tokens"] > usage["cached_tokens"] > 0
    assert 0 < usage["output_tokens"] <= 4 or result["finish_reason"] == "stop"
    assert usage["ttft_s"] > 0


@pytest.mark.parametrize("arch", ["falcon", "mpt"])
def test_run_streams_then_prints_usage(arch, cli_main):
    out = cli_main("run", *PERSONA, "--tiny", arch, "--max-new-tokens", "4", "--no-cache", "--seed", "0",
              "--temperature", "0.8", "--top-p", "0.9", "--top-k", "20")
    assert out.returncode == 0, out.stderr
    assert re.search(r"TTFT \d+ ms; input \d+ tokens \(0 cached\)", out.stdout), out.stdout


def test_run_plain_text_prompt(cli_main):
    out = cli_main("run", "--schema", str(SCHEMAS / "codegen.xml"), "--prompt", "What does store.py do?",
              "--tiny", "llama", "--max-new-tokens", "2", "--json")
    assert out.returncode == 0, out.stderr
    usage = json.loads(out.stdout)["usage"]
    assert usage["cached_tokens"] > 1000   # every file of the package was spliced in


def test_run_unknown_module_is_a_user_error(tmp_path, cli_main):
    prompt = tmp_path / "p.xml"
    prompt.write_text('<prompt schema="persona"><no_such_module/>hi</prompt>')
    out = cli_main("run", "--schema", str(SCHEMAS / "persona.xml"), "--prompt", str(prompt), "--tiny", "llama")
    assert out.returncode == 2
    assert "no_such_module" in out.stderr
    assert "Traceback" not in out.stderr


def test_layout_lists_modules_with_positions(cli_main):
    out = cli_main("layout", "--schema", str(SCHEMAS / "travel.xml"), "--model", "tiny")
    assert out.returncode == 0, out.stderr
    assert "NOTE: a random-weight test model's tokenizer" in out.stdout  # never quietly
    lines = out.stdout.splitlines()
    rows = [line.split() for line in lines[lines.index(next(x for x in lines if x.startswith("module"))) + 1:]]
    assert rows and rows[0][0] == "(root)"
    for row in rows:
        start, end, tokens = map(int, row[1:4])
        assert start <= end and tokens <= end - start or row[0] == "(root)"


@pytest.mark.parametrize("args, message", [
    (["--model", "tiny", "--device", "tpu"], "unknown device 'tpu'; valid: auto, cpu, cuda"),
    (["--model", "tiny", "--dtype", "half"], "unknown dtype 'half'; valid: auto, float32"),
    (["--model", "missing.gguf"], "cannot load model 'missing.gguf': no such file or directory"),
])
def test_run_model_errors_are_one_line(args, message, cli_main):
    out = cli_main("run", *PERSONA, *args)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def test_layout_with_the_real_model_uses_its_tokenizer_and_template(smollm2, cli_main):
    from promptcache.markup.chat import chat_format_for
    from promptcache.markup.layout import compile_schema
    from promptcache.markup.parse import parse_schema

    out = cli_main("layout", "--schema", str(SCHEMAS / "codegen.xml"))  # the default model: not the tiny one
    assert out.returncode == 0, out.stderr
    chat = chat_format_for(smollm2.tokenizer, smollm2.model.config)
    layout = compile_schema(parse_schema(SCHEMAS / "codegen.xml"), smollm2.tokenizer, chat)
    assert f"schema 'codegen': {layout.length} positions" in out.stdout
    assert chat.name == "derived:chatml"  # SmolLM2's model type is llama, its template ChatML
    assert f"chat format {chat.name!r}" in out.stdout and "smollm2-135m-instruct" in out.stdout
    assert "random-weight" not in out.stdout


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_validate_checks_prompts_against_the_schemas_given(tmp_path, capsys):
    schema = _write(tmp_path, "s.xml", '<schema name="s"><module name="doc">Text.</module>'
                                       '<module name="trip">Lasts <parameter name="days" length="4"/>.</module>'
                                       '<union><module name="a">A</module><module name="b">B</module></union></schema>')
    good = _write(tmp_path, "good.xml", '<prompt schema="s"><doc/><trip days="3"/><a/>Why?</prompt>')
    bad = {"missing.xml": ('<prompt schema="s"><nope/>Why?</prompt>', "unknown module 'nope'"),
           "union.xml": ('<prompt schema="s"><a/><b/>Why?</prompt>', "one union"),
           "argument.xml": ('<prompt schema="s"><trip/>Why?</prompt>', "days"),
           "other.xml": ('<prompt schema="t"><doc/>Why?</prompt>', "schemas given: s")}
    assert main(["validate", schema, good]) == 0
    assert "checked against it" in capsys.readouterr().out
    for name, (text, message) in bad.items():
        path = _write(tmp_path, name, text)
        assert main(["validate", path]) == 0, "alone, a prompt is only checked for its own structure"
        assert main(["validate", schema, path]) == 1
        assert message in capsys.readouterr().out


def test_validate_does_not_import_torch():
    code = ("import sys; from promptcache.cli import main; "
            "rc = main(['validate', 'schemas/travel.xml', 'schemas/travel.prompt.xml']); "
            "assert 'torch' not in sys.modules, 'validate imported torch'; sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_run_says_which_modules_a_plain_prompt_used(tmp_path, capsys):
    schema = _write(tmp_path, "s.xml", '<schema name="s"><module name="doc">Text.</module><module name="trip">'
                                       'Lasts <parameter name="days" length="4"/>.</module></schema>')
    assert main(["run", "--schema", schema, "--prompt", "Why?", "--model", "tiny", "--max-new-tokens", "2",
                 "--stop", "x", "--stop", "y"]) == 0
    err = capsys.readouterr().err
    assert "modules used: doc" in err and "left out: trip (needs argument(s) days" in err


# ---- a new user's first hour (issue 29) -----------------------------------------------------------------


def test_old_underscore_flags_work_with_a_note(capsys):
    from promptcache.cli import build_parser, normalize_flags

    argv, notes = normalize_flags(["run", "--max_new_tokens=4", "--top_p", "0.5", "--schema", "a_b.xml",
                                   "--", "--no_such_flag"], build_parser())
    assert argv == ["run", "--max-new-tokens=4", "--top-p", "0.5", "--schema", "a_b.xml", "--", "--no_such_flag"]
    assert notes == ["note: --max_new_tokens is deprecated; use --max-new-tokens",
                     "note: --top_p is deprecated; use --top-p"]


def test_every_command_takes_threads():
    from promptcache.cli import build_parser

    parser = build_parser()
    for command in (["validate", "x.xml"], ["run", "--schema", "s", "--prompt", "p"], ["layout", "--schema", "s"],
                    ["serve"]):
        assert parser.parse_args([*command, "--threads", "1"]).threads == 1, command


def test_run_defaults_to_the_demos_model_and_the_store_under_the_cache_dir(promptcache_cache_dir):
    from promptcache.cli import build_parser, store_dir_of

    args = build_parser().parse_args(["run", "--schema", "s.xml", "--prompt", "p"])
    assert (args.model or args.default_model) == "smollm2-135m-instruct"
    assert store_dir_of(args) == str(promptcache_cache_dir / "modules")
    assert store_dir_of(build_parser().parse_args(["run", "--schema", "s", "--prompt", "p", "--no-store"])) is None


def test_a_misspelt_model_name_suggests_the_built_in_one(cli_main):
    out = cli_main("run", *PERSONA, "--model", "smollm2-135m")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "cannot load model 'smollm2-135m'" in out.stderr
    assert "did you mean 'smollm2-135m-instruct'?" in out.stderr


def test_run_a_second_time_encodes_nothing(tmp_path, cli_main):
    store = ["--store-dir", str(tmp_path / "store"), "--tiny", "llama", "--max-new-tokens", "2", "--json"]
    first = cli_main("run", *PERSONA, *store)
    assert first.returncode == 0, first.stderr
    assert re.search(r"encoded \d+ module\(s\) in [\d.]+ s; stored in ", first.stderr), first.stderr
    second = cli_main("run", *PERSONA, *store)  # a new engine: what it has is in the store
    assert second.returncode == 0, second.stderr
    assert re.search(r"nothing encoded, \d+ module\(s\) loaded from the store .* [\d.]+ s saved", second.stderr)
    assert json.loads(second.stdout)["text"] == json.loads(first.stdout)["text"]


SCHEMA_WITH_PARAMETER = ('<schema name="s"><module name="trip">Lasts <parameter name="days" length="2"/> days.'
                         '</module></schema>')


def test_validate_without_a_model_says_what_it_could_not_check(tmp_path, capsys):
    schema = _write(tmp_path, "s.xml", SCHEMA_WITH_PARAMETER)
    long = _write(tmp_path, "long.xml", '<prompt schema="s"><trip days="one two three four five six"/>Hi</prompt>')
    assert main(["validate", schema, long]) == 0  # two tokens? only a tokenizer knows
    out = capsys.readouterr().out
    assert "not checked without --model: argument lengths" in out and "context window" in out


def test_validate_with_a_model_checks_argument_lengths_and_the_window(tmp_path, capsys):
    schema = _write(tmp_path, "s.xml", SCHEMA_WITH_PARAMETER)
    good = _write(tmp_path, "good.xml", '<prompt schema="s"><trip days="3"/>Hi</prompt>')
    long = _write(tmp_path, "long.xml", '<prompt schema="s"><trip days="one two three four five six"/>Hi</prompt>')
    assert main(["validate", "--model", "tiny", schema, good]) == 0
    out = capsys.readouterr().out
    assert "arguments fit their parameters" in out and "not checked" not in out
    assert main(["validate", "--model", "tiny", schema, long]) == 1
    out = capsys.readouterr().out
    assert "long.xml: argument for parameter 'days' of module 'trip' is" in out and "tokens" in out
    huge = _write(tmp_path, "huge.xml", f'<prompt schema="s"><trip days="3"/>{"word " * 17000}</prompt>')
    assert main(["validate", "--model", "tiny", schema, huge]) == 1
    assert "context window is" in capsys.readouterr().out
    big = _write(tmp_path, "big.xml", f'<schema name="b"><module name="m">{"word " * 17000}</module></schema>')
    assert main(["validate", "--model", "tiny", big]) == 1
    assert "big.xml: schema 'b' is" in capsys.readouterr().out


def test_validate_with_a_model_loads_no_weights(tmp_path, monkeypatch):
    import promptcache.models.load as load

    monkeypatch.setattr(load, "load_model", lambda *a, **k: pytest.fail("validate loaded the weights"))
    assert main(["validate", "--model", "tiny", str(SCHEMAS / "travel.xml"), str(SCHEMAS / "travel.prompt.xml")]) == 0
