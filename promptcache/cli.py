"""The `promptcache` command line: validate PML, run a prompt, show a schema's position layout.

    promptcache validate schemas/*.xml
    promptcache validate --model smollm2-135m-instruct schemas/travel.xml schemas/travel.prompt.xml  # + tokens
    promptcache run --schema schemas/codegen.xml --prompt "What does store.py do?"    # smollm2-135m-instruct
    promptcache run --schema schemas/codegen.xml --prompt schemas/codegen.prompt.xml --model tiny
    promptcache run --schema s.xml --prompt p.xml --model path/to/model.gguf      # or a directory, a hub id
    promptcache layout --schema schemas/travel.xml
    promptcache serve --model smollm2-135m-instruct --schemas schemas/ --port 8000

Like `demo.py`, this is a script: it holds `main` and the prints. User mistakes (bad paths, bad
PML, unknown modules) print one line, `file:line:col: message` where known, and exit 2 (1 for
`validate`, which reports every file); no traceback. Flags are spelt with dashes
(`--max-new-tokens`); the underscore spellings (`--max_new_tokens`) still work, with a note.
Every command takes `--threads` (default: one per free core, `models.threads`); `run` keeps module
states in the store under the cache directory (`--store-dir`, `--no-store`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

from .errors import PromptCacheError, SchemaError

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2
DEFAULT_MODEL = "smollm2-135m-instruct"  # demo.py's default too


def format_error(error: BaseException, fallback_source: str | None = None) -> str:
    """One line for a user's mistake: `file:line:col: message` when the location is known."""
    if isinstance(error, SchemaError):
        source = error.source or fallback_source or "<string>"
        where = source
        if error.line is not None:
            where += f":{error.line}" + (f":{error.column}" if error.column is not None else "")
        return f"{where}: {error.message}"
    if isinstance(error, OSError):
        name = error.filename
        reason = error.strerror or str(error)
        return f"{name}: {reason}" if name else reason
    return str(error)


def build_engine(*, model: str, device: str = "auto", dtype: str = "auto", progress: bool = True,
                 store_dir: str | None = None):
    """An `Engine` over `model`: any name `load_model` takes (hub id, directory, .gguf, built-in, tiny)."""
    from .engine.engine import Engine
    from .models.load import load_model

    loaded = load_model(model, device=device, dtype=dtype)
    return Engine(loaded.model, loaded.tokenizer, progress=progress, store_dir=store_dir)


def store_dir_of(args: argparse.Namespace) -> str | None:
    """`--store-dir`, else the default store under the cache directory; None with `--no-store`."""
    from .models.convert import default_store_dir

    if args.no_store:
        return None
    return args.store_dir or str(default_store_dir())


def normalize_flags(argv: Sequence[str], parser: argparse.ArgumentParser) -> tuple[list[str], list[str]]:
    """`argv` with old underscore spellings (`--max_new_tokens=8`) rewritten to the dashed flags the parser
    knows (`--max-new-tokens=8`), and a deprecation note for each one rewritten."""
    known = _option_strings(parser)
    out, notes = [], []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        dashed = flag.replace("_", "-")
        if flag.startswith("--") and "_" in flag and flag not in known and dashed in known:
            notes.append(f"note: {flag} is deprecated; use {dashed}")
            arg = dashed + eq + value
        out.append(arg)
        if arg == "--":
            out.extend(argv[len(out):])
            break
    return out, notes


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    found = set()
    for action in parser._actions:  # NOTE: argparse has no public walk of its options
        found.update(action.option_strings)
        for sub in (getattr(action, "choices", None) or {}).values() if isinstance(action, argparse._SubParsersAction) \
                else ():
            found |= _option_strings(sub)
    return found


@dataclass(frozen=True)
class PromptChoice:
    """The PML prompt `run` sends, and for plain text which modules it used and why others not."""

    text: str
    used: tuple[str, ...] = ()
    left_out: tuple[str, ...] = ()  # "name (why)"


def read_prompt(value: str, schema_name: str, layout=None) -> PromptChoice:
    """PML prompt text from a file path, PML text, or plain text.

    Plain text becomes a prompt over every top-level module that needs no argument (a union
    contributes its scaffold member), with the text as the user's turn; the choice says which
    modules were used and why the others were left out.
    """
    path = Path(value)
    if "\n" not in value and len(value) < 4096 and path.is_file():
        return PromptChoice(path.read_text(encoding="utf-8"))
    from .markup.parse import is_pml

    if is_pml(value):
        return PromptChoice(value)
    used, left_out = [], []
    if layout is not None:
        scaffolds = {u.scaffold for u in layout.unions}
        for path_, mod in layout.modules.items():
            if not path_ or "/" in path_:
                continue
            if mod.slots:
                left_out.append(f"{mod.name} (needs argument(s) {', '.join(mod.slots)}: write a PML prompt)")
            elif mod.union is not None and path_ not in scaffolds:
                left_out.append(f"{mod.name} (a union member; its scaffold is used)")
            else:
                used.append(mod.name)
    body = "".join(f"<{name}/>" for name in used)
    text = f'<prompt schema="{escape(schema_name)}">{body}<user>{escape(value)}</user></prompt>'
    return PromptChoice(text, tuple(used), tuple(left_out))


# ---- validate ------------------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    """Each file on its own, then each prompt against the schemas given with it; with `--model`, the tokens."""
    from .validate import NOT_CHECKED, load_tokens, parse_file, validate

    failed, parsed = 0, {}
    for name in args.files:
        try:
            parsed[name] = parse_file(name)
        except (PromptCacheError, OSError) as e:
            failed += 1
            print(format_error(e, name))
    tokens = None
    if args.model is not None or args.tiny is not None:  # else torch is never imported: validate starts fast
        _threads(args)
        tokens = load_tokens(_model_name(args))
    for result in validate(parsed, tokens):
        failed += not result.ok
        print(result.line)
    if tokens is None and parsed:
        print(NOT_CHECKED)
    return EXIT_INVALID if failed else EXIT_OK


# ---- run -----------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    _threads(args)
    engine = build_engine(model=_model_name(args), device=args.device, dtype=args.dtype,
                          store_dir=store_dir_of(args))
    layout = engine.add_schema(args.schema)
    added = engine.schema_added(layout.name)
    print(schema_added_line(added, engine.disk.root if engine.disk is not None else None), file=sys.stderr)
    choice = read_prompt(args.prompt, layout.name, layout)
    if choice.used or choice.left_out:
        print(f"modules used: {', '.join(choice.used) or '(none)'}", file=sys.stderr)
        for item in choice.left_out:
            print(f"left out: {item}", file=sys.stderr)
    prompt = choice.text
    params = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                  top_k=args.top_k, seed=args.seed, stop=args.stop, enable_cache=not args.no_cache)
    if args.json:
        completion = engine.generate(prompt, **params)
        print(json.dumps({"text": completion.text, "finish_reason": completion.finish_reason,
                          "usage": completion.usage.to_dict()}))
        return EXIT_OK
    usage, finish = None, None
    for chunk in engine.stream(prompt, **params):
        print(chunk.text, end="", flush=True)
        if chunk.usage is not None:
            usage, finish = chunk.usage, chunk.finish_reason
    print()
    print(usage_line(usage) + f"; finish: {finish}")
    return EXIT_OK


def schema_added_line(added, store) -> str:
    """One line on what adding a schema did: encoded (and stored), or loaded from the store, with the time saved."""
    where = f" from the store {store}" if store is not None else ""
    if not added.encoded:
        saved = added.stored_encode_s - added.seconds
        note = (f"; encoding them took {added.stored_encode_s:.1f} s: {saved:.1f} s saved"
                if added.stored_encode_s else "")
        return (f"schema '{added.name}': nothing encoded, {len(added.loaded)} module(s) loaded{where} in "
                f"{added.seconds:.1f} s{note}")
    kept = f"; stored in {store}: the next run loads them" if store is not None else " (--no-store: not kept)"
    loaded = f", {len(added.loaded)} loaded{where}" if added.loaded else ""
    return f"schema '{added.name}': encoded {len(added.encoded)} module(s) in {added.encode_s:.1f} s{loaded}{kept}"


def usage_line(usage) -> str:
    return (f"TTFT {usage.ttft_s * 1000:.0f} ms; input {usage.input_tokens} tokens "
            f"({usage.cached_tokens} cached), output {usage.output_tokens} tokens; "
            f"total {usage.total_s:.2f} s")


# ---- layout --------------------------------------------------------------------------------


def cmd_layout(args: argparse.Namespace) -> int:
    from .markup.chat import chat_format_for
    from .markup.layout import compile_schema
    from .markup.parse import parse_schema
    from .models.load import load_tokenizer

    schema = parse_schema(args.schema)
    _threads(args)
    loaded = load_tokenizer(_model_name(args))
    chat = chat_format_for(loaded.tokenizer, loaded.config)
    tokenizer = loaded.tokenizer
    layout = compile_schema(schema, tokenizer, chat)
    print(f"model {loaded.name}: {loaded.source}")
    if loaded.kind == "tiny":
        print("NOTE: a random-weight test model's tokenizer; positions differ from a real model's")
    print(f"schema '{layout.name}': {layout.length} positions, {len(layout.passes)} encode pass(es), "
          f"chat format {chat.name!r}")
    print(f"{'module':<32} {'start':>6} {'end':>6} {'tokens':>7}  notes")
    for path, mod in sorted(layout.modules.items(), key=lambda kv: (kv[1].start, kv[0].count("/"))):
        notes = []
        if not mod.cache:
            notes.append("cache=false")
        if mod.union is not None:
            u = layout.unions[mod.union]
            notes.append(f"union@{u.start}+{u.length}" + (" scaffold" if u.scaffold == path else ""))
        notes += [f"param {s.name}@{s.start}+{s.length}" for s in mod.slots.values()]
        label = "  " * path.count("/") + (path.rsplit("/", 1)[-1] if path else "(root)")
        print(f"{label:<32} {mod.start:>6} {mod.end:>6} {len(mod.token_ids):>7}  {', '.join(notes)}")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from .server.main import run

    return run(args, _model_name(args))


# ---- parser --------------------------------------------------------------------------------


def _add_model_args(p: argparse.ArgumentParser, default: str | None, required: bool | None = None,
                    purpose: str = "") -> None:
    from .models.names import ARCHS, BUILTIN_MODEL_NAMES, TINY_MODEL_NAMES

    group = p.add_mutually_exclusive_group(required=default is None if required is None else required)
    group.add_argument("--model", metavar="NAME_OR_PATH",
                       help=(f"{purpose}: " if purpose else "")
                            + "a hub id, a checkpoint directory, a .gguf file, or a built-in name: "
                            f"{', '.join(BUILTIN_MODEL_NAMES)} (real, offline once installed), "
                            f"{', '.join(TINY_MODEL_NAMES)} (random weights, meaningless text)"
                            + (f"; default: {default}" if default else ""))
    group.add_argument("--tiny", metavar="ARCH", choices=ARCHS,
                       help="same as --model tiny-ARCH: a built-in random-weight model: " + ", ".join(ARCHS))
    p.set_defaults(default_model=default)


def _threads(args: argparse.Namespace) -> None:
    """Set torch's threads: `--threads`, else one per free core (`models.threads`); serve does its own."""
    from .models.threads import configure_threads

    choice = configure_threads(args.threads)
    print(f"torch: {choice.describe()}", file=sys.stderr)


def _add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads (default: one per free core, measured at start; "
                        "$PROMPTCACHE_THREADS or $OMP_NUM_THREADS override it)")


def _add_store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store-dir", metavar="DIR",
                   help="keep module states there across runs (default: modules/ in the cache directory, "
                        "$PROMPTCACHE_CACHE_DIR or ~/.cache/promptcache)")
    p.add_argument("--no-store", action="store_true", help="keep module states in memory only (encode every run)")


def _model_name(args: argparse.Namespace) -> str:
    if args.tiny is not None:
        return f"tiny-{args.tiny}"
    return args.model if args.model is not None else args.default_model


def _add_device_args(p: argparse.ArgumentParser) -> None:
    from .models.names import DEVICES, DTYPE_NAMES

    p.add_argument("--device", default="auto", help=f"{', '.join(DEVICES)} (default: auto, CUDA when present)")
    p.add_argument("--dtype", default="auto",
                   help=f"auto, {', '.join(DTYPE_NAMES)} (default: auto, float32 on the CPU)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="promptcache", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check schema and prompt PML files",
                       description="Check PML files (schemas or prompts): OK, or file:line:col: message. "
                                   "Prompts are also checked against the schemas given with them.")
    p.add_argument("files", nargs="+", metavar="FILE")
    _add_model_args(p, default=None, required=False,
                    purpose="also check with its tokenizer (no weights loaded): argument lengths, context window")
    _add_threads_arg(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("run", help="add a schema, then stream the answer to a prompt",
                       description="Encode a schema's modules, then serve one prompt with them.")
    p.add_argument("--schema", required=True, metavar="FILE")
    p.add_argument("--prompt", required=True, metavar="FILE_OR_TEXT",
                   help="a prompt PML file, PML text, or plain text (then every top-level module is used)")
    _add_model_args(p, default=DEFAULT_MODEL)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop generating at TEXT (repeatable)")
    p.add_argument("--no-cache", action="store_true", help="prefill every prompt token (the baseline)")
    _add_device_args(p)
    _add_store_args(p)
    _add_threads_arg(p)
    p.add_argument("--json", action="store_true", help="print one JSON object: text, finish_reason, usage")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("layout", help="show where each module's positions go",
                       description="Print each module's start/end positions and token count "
                                   "(tokenizer only: no model weights are loaded).")
    p.add_argument("--schema", required=True, metavar="FILE")
    _add_model_args(p, default=DEFAULT_MODEL)
    _add_threads_arg(p)
    p.set_defaults(func=cmd_layout)

    p = sub.add_parser("serve", help="serve the OpenAI API (chat, completions, schemas) over HTTP",
                       description="Load the model once and serve OpenAI-compatible endpoints until SIGTERM.")
    _add_model_args(p, default=DEFAULT_MODEL)
    _add_device_args(p)
    from .server.main import add_arguments as add_serve_arguments

    add_serve_arguments(p)
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `promptcache` console script; returns the exit code."""
    parser = build_parser()
    argv, notes = normalize_flags(sys.argv[1:] if argv is None else list(argv), parser)
    for note in notes:
        print(f"promptcache: {note}", file=sys.stderr)
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.func(args)
    except (PromptCacheError, OSError) as e:
        source = getattr(args, "schema", None)
        print(f"promptcache: {format_error(e, source)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
