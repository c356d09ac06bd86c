"""The `promptcache` command line: validate PML, run a prompt, show a schema's position layout.

    promptcache validate schemas/*.xml
    promptcache run --schema schemas/codegen.xml --prompt schemas/codegen.prompt.xml --tiny llama
    promptcache run --schema s.xml --prompt "What does store.py do?" --model meta-llama/Llama-2-7b-chat-hf
    promptcache layout --schema schemas/travel.xml

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
from pathlib import Path
from xml.sax.saxutils import escape

from .errors import PromptCacheError, SchemaError

TINY_MAX_POSITIONS = 8192  # the codegen example is ~7.5k tokens under the tiny tokenizer

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


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise PromptCacheError("--device cuda was asked for, but torch sees no CUDA device")
    return device


def build_engine(*, model: str | None, tiny: str | None, device: str = "auto", progress: bool = True,
                 **tiny_shape):
    """An `Engine` over a checkpoint (`model`) or a random-weight tiny model (`tiny` arch)."""
    from .engine.engine import Engine

    device = resolve_device(device)
    if model is not None:
        try:
            return Engine.from_pretrained(model, device=device, progress=progress)
        except (OSError, ValueError) as e:  # hub/transformers errors for a bad id or directory
            if isinstance(e, PromptCacheError):
                raise
            raise PromptCacheError(f"cannot load model {str(model)!r}: {e}") from None
    from .testing import tiny_model

    shape = {"max_positions": TINY_MAX_POSITIONS, **tiny_shape}
    net, tokenizer = tiny_model(tiny or "llama", **shape)
    return Engine(net, tokenizer, device=device, progress=progress)


def read_prompt(value: str, schema_name: str, layout=None) -> str:
    """PML prompt text from a file path, PML text, or plain text.

    Plain text becomes a prompt over every top-level module that needs no argument (a union
    contributes its scaffold member), with the text as the user's turn.
    """
    path = Path(value)
    if "\n" not in value and len(value) < 4096 and path.is_file():
        return path.read_text(encoding="utf-8")
    from .markup.parse import is_pml

    if is_pml(value):
        return value
    selected = []
    if layout is not None:
        scaffolds = {u.scaffold for u in layout.unions}
        for path_, mod in layout.modules.items():
            if path_ and "/" not in path_ and not mod.slots and (mod.union is None or path_ in scaffolds):
                selected.append(f"<{mod.name}/>")
    body = "".join(selected)
    return f'<prompt schema="{escape(schema_name)}">{body}<user>{escape(value)}</user></prompt>'


# ---- validate ------------------------------------------------------------------------------


def _root_tag(text: str) -> str | None:
    from .markup.xmlsafe import prolog_end

    start = prolog_end(text)
    for tag in ("schema", "prompt"):
        if text.startswith("<" + tag, start):
            return tag
    return None


def validate_file(name: str) -> str:
    """"OK" summary for a valid schema or prompt file; raises SchemaError/OSError otherwise."""
    from .markup.nodes import Module
    from .markup.parse import parse_prompt, parse_schema
    from .markup.xmlsafe import read_text_file

    text = read_text_file(Path(name), 8 << 20, what="PML file")
    if _root_tag(text) == "prompt":
        prompt = parse_prompt(name)
        return f"OK (prompt for schema '{prompt.schema}', {len(prompt.selections)} selection(s))"
    schema = parse_schema(name)
    count = 0
    stack = list(schema.children)
    while stack:
        node = stack.pop()
        count += isinstance(node, Module)
        stack.extend(getattr(node, "children", ()) or getattr(node, "members", ()) or ())
    return f"OK (schema '{schema.name}', {count} module(s))"


def cmd_validate(args: argparse.Namespace) -> int:
    failed = 0
    for name in args.files:
        try:
            print(f"{name}: {validate_file(name)}")
        except (PromptCacheError, OSError) as e:
            failed += 1
            print(format_error(e, name))
    return EXIT_INVALID if failed else EXIT_OK


# ---- run -----------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    engine = build_engine(model=args.model, tiny=args.tiny, device=args.device)
    layout = engine.add_schema(args.schema)
    prompt = read_prompt(args.prompt, layout.name, layout)
    params = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                  top_k=args.top_k, seed=args.seed, enable_cache=not args.no_cache)
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
    from .markup.layout import compile_schema
    from .markup.parse import parse_schema

    schema = parse_schema(args.schema)
    if args.model is not None:
        from transformers import AutoConfig, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        chat = _chat_for(tokenizer, AutoConfig.from_pretrained(args.model))
    else:
        tokenizer, chat = _tiny_tokenizer_and_chat(args.tiny or "llama")
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


def _chat_for(tokenizer, config):
    from .markup.chat import chat_format_for

    return chat_format_for(tokenizer, config)


def _tiny_tokenizer_and_chat(arch: str):
    from .testing import _config, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = _config(arch, tokenizer, 64, 1, 4, TINY_MAX_POSITIONS, {})
    return tokenizer, _chat_for(tokenizer, config)


# ---- parser --------------------------------------------------------------------------------


def _add_model_args(p: argparse.ArgumentParser, required: bool) -> None:
    from .testing import ARCHS

    group = p.add_mutually_exclusive_group(required=required)
    group.add_argument("--model", metavar="PATH_OR_ID",
                       help="a transformers checkpoint (hub id or local dir)")
    group.add_argument("--tiny", metavar="ARCH", choices=ARCHS,
                       help=f"a built-in random-weight model, offline: {', '.join(ARCHS)} (meaningless text)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="promptcache", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check schema and prompt PML files",
                       description="Check PML files (schemas or prompts): OK, or file:line:col: message.")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("run", help="add a schema, then stream the answer to a prompt",
                       description="Encode a schema's modules, then serve one prompt with them.")
    p.add_argument("--schema", required=True, metavar="FILE")
    p.add_argument("--prompt", required=True, metavar="FILE_OR_TEXT",
                   help="a prompt PML file, PML text, or plain text (then every top-level module is used)")
    _add_model_args(p, required=True)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-cache", action="store_true", help="prefill every prompt token (the baseline)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object: text, finish_reason, usage")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("layout", help="show where each module's positions go",
                       description="Print each module's start/end positions and token count "
                                   "(tokenizer only: no model weights are loaded).")
    p.add_argument("--schema", required=True, metavar="FILE")
    _add_model_args(p, required=False)
    p.set_defaults(func=cmd_layout)
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
