"""The `promptcache` command line: validate PML, run a prompt, show a schema's position layout.

    promptcache validate schemas/*.xml
    promptcache run --schema schemas/codegen.xml --prompt "What does store.py do?" --model smollm2-135m-instruct
    promptcache run --schema schemas/codegen.xml --prompt schemas/codegen.prompt.xml --model tiny
    promptcache run --schema s.xml --prompt p.xml --model path/to/model.gguf      # or a directory, a hub id
    promptcache layout --schema schemas/travel.xml
    promptcache serve --model smollm2-135m-instruct --schemas schemas/ --port 8000

Like `demo.py`, this is a script: it holds `main` and the prints. User mistakes (bad paths, bad
PML, unknown modules) print one line, `file:line:col: message` where known, and exit 2 (1 for
`validate`, which reports every file); no traceback.
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


def build_engine(*, model: str, device: str = "auto", dtype: str = "auto", progress: bool = True):
    """An `Engine` over `model`: any name `load_model` takes (hub id, directory, .gguf, built-in, tiny)."""
    from .engine.engine import Engine
    from .models.load import load_model

    loaded = load_model(model, device=device, dtype=dtype)
    return Engine(loaded.model, loaded.tokenizer, progress=progress)


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


def _root_tag(text: str) -> str | None:
    from .markup.xmlsafe import prolog_end

    start = prolog_end(text)
    for tag in ("schema", "prompt"):
        if text.startswith("<" + tag, start):
            return tag
    return None


def _module_count(schema) -> int:
    from .markup.nodes import Module

    count, stack = 0, list(schema.children)
    while stack:
        node = stack.pop()
        count += isinstance(node, Module)
        stack.extend(getattr(node, "children", ()) or getattr(node, "members", ()) or ())
    return count


def parse_file(name: str):
    """The `Schema` or `Prompt` in a PML file; raises SchemaError/OSError otherwise."""
    from .markup.parse import parse_prompt, parse_schema
    from .markup.xmlsafe import read_text_file

    text = read_text_file(Path(name), 8 << 20, what="PML file")
    return parse_prompt(name) if _root_tag(text) == "prompt" else parse_schema(name)


def cmd_validate(args: argparse.Namespace) -> int:
    """Each file on its own, then each prompt against the schemas given with it."""
    from .markup.nodes import Prompt
    from .markup.scope import check_prompt_against

    failed, parsed = 0, {}
    for name in args.files:
        try:
            parsed[name] = parse_file(name)
        except (PromptCacheError, OSError) as e:
            failed += 1
            print(format_error(e, name))
    schemas = [doc for doc in parsed.values() if not isinstance(doc, Prompt)]
    for name, doc in parsed.items():
        if not isinstance(doc, Prompt):
            print(f"{name}: OK (schema '{doc.name}', {_module_count(doc)} module(s))")
            continue
        if not schemas:
            print(f"{name}: OK (prompt for schema '{doc.schema}', {len(doc.selections)} selection(s); "
                  "give its schema file too to check the selections against it)")
            continue
        try:
            check_prompt_against(doc, schemas)
            print(f"{name}: OK (prompt for schema '{doc.schema}', {len(doc.selections)} selection(s), "
                  "checked against it)")
        except PromptCacheError as e:
            failed += 1
            print(format_error(e, name))
    return EXIT_INVALID if failed else EXIT_OK


# ---- run -----------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    engine = build_engine(model=_model_name(args), device=args.device, dtype=args.dtype)
    layout = engine.add_schema(args.schema)
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
    loaded = load_tokenizer(_model_name(args))
    chat = chat_format_for(loaded.tokenizer, loaded.config)
    tokenizer = loaded.tokenizer
    layout = compile_schema(schema, tokenizer, chat)
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


def _add_model_args(p: argparse.ArgumentParser, default: str | None) -> None:
    from .models.names import ARCHS, BUILTIN_MODEL_NAMES, TINY_MODEL_NAMES

    group = p.add_mutually_exclusive_group(required=default is None)
    group.add_argument("--model", metavar="NAME_OR_PATH",
                       help="a hub id, a checkpoint directory, a .gguf file, or a built-in name: "
                            f"{', '.join(BUILTIN_MODEL_NAMES)} (real, offline once installed), "
                            f"{', '.join(TINY_MODEL_NAMES)} (random weights, meaningless text)"
                            + (f"; default: {default}" if default else ""))
    group.add_argument("--tiny", metavar="ARCH", choices=ARCHS,
                       help="same as --model tiny-ARCH: a built-in random-weight model: " + ", ".join(ARCHS))
    p.set_defaults(default_model=default)


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
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("run", help="add a schema, then stream the answer to a prompt",
                       description="Encode a schema's modules, then serve one prompt with them.")
    p.add_argument("--schema", required=True, metavar="FILE")
    p.add_argument("--prompt", required=True, metavar="FILE_OR_TEXT",
                   help="a prompt PML file, PML text, or plain text (then every top-level module is used)")
    _add_model_args(p, default=None)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop generating at TEXT (repeatable)")
    p.add_argument("--no-cache", action="store_true", help="prefill every prompt token (the baseline)")
    _add_device_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object: text, finish_reason, usage")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("layout", help="show where each module's positions go",
                       description="Print each module's start/end positions and token count "
                                   "(tokenizer only: no model weights are loaded).")
    p.add_argument("--schema", required=True, metavar="FILE")
    _add_model_args(p, default="tiny")
    p.set_defaults(func=cmd_layout)

    p = sub.add_parser("serve", help="serve the OpenAI API (chat, completions, schemas) over HTTP",
                       description="Load the model once and serve OpenAI-compatible endpoints until SIGTERM.")
    _add_model_args(p, default=None)
    _add_device_args(p)
    from .server.main import add_arguments as add_serve_arguments

    add_serve_arguments(p)
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `promptcache` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
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
