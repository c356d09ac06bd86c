"""What `promptcache validate` checks: PML files on their own, prompts against their schemas, and with a
model's tokenizer (`--model`, no weights loaded, nothing encoded) what needs tokens.

    without a tokenizer   well-formed PML, the schema rules, each prompt's selections against its schema
    with a tokenizer      each argument's tokens against its parameter's length, each schema's and each
                          prompt's positions against the model's context window

Each file gets one line: `NAME: OK (...)` or `NAME[:line:col]: message`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import PromptCacheError

NOT_CHECKED = ("not checked without --model: argument lengths in tokens against their parameters, and whether "
               "schemas and prompts fit the model's context window (--model NAME reads its tokenizer only: "
               "no weights are loaded, nothing is encoded)")


@dataclass(frozen=True)
class FileResult:
    """One file's verdict: `ok`, and the line to print."""

    name: str
    ok: bool
    line: str


@dataclass(frozen=True)
class Tokens:
    """What the token checks need from a model: its tokenizer, chat format and context window."""

    tokenizer: object
    chat: object
    max_positions: int
    model: str


def load_tokens(model: str) -> Tokens:
    """The tokenizer, chat format and context window of `model` (any name `load_model` takes), no weights."""
    from .markup.chat import chat_format_for
    from .models.adapter import config_max_positions
    from .models.load import load_tokenizer

    loaded = load_tokenizer(model)
    return Tokens(loaded.tokenizer, chat_format_for(loaded.tokenizer, loaded.config),
                  config_max_positions(loaded.config), model)


def validate(parsed: dict, tokens: Tokens | None) -> list[FileResult]:
    """Check parsed documents (name -> `Schema` or `Prompt`): schemas first, then prompts against them."""
    from .markup.nodes import Prompt

    results, layouts = [], {}
    schemas = [doc for doc in parsed.values() if not isinstance(doc, Prompt)]
    for name, doc in parsed.items():
        if isinstance(doc, Prompt):
            continue
        try:
            detail = ""
            if tokens is not None:
                layouts[doc.name] = layout = _compile(doc, tokens)
                detail = f", {layout.length} positions of the {tokens.max_positions} in {tokens.model}'s window"
            results.append(FileResult(name, True, f"{name}: OK (schema '{doc.name}', {_module_count(doc)} "
                                                   f"module(s){detail})"))
        except PromptCacheError as e:
            results.append(FileResult(name, False, _error_line(e, name)))
    for name, doc in parsed.items():
        if isinstance(doc, Prompt):
            results.append(_check_prompt(name, doc, schemas, layouts, tokens))
    return results


def _check_prompt(name: str, doc, schemas: list, layouts: dict, tokens: Tokens | None) -> FileResult:
    from .markup.scope import check_prompt_against

    head = f"{name}: OK (prompt for schema '{doc.schema}', {len(doc.selections)} selection(s)"
    if not schemas:
        return FileResult(name, True, f"{head}; give its schema file too to check the selections against it)")
    try:
        check_prompt_against(doc, schemas)
        if tokens is None or doc.schema not in layouts:
            return FileResult(name, True, f"{head}, checked against it)")
        from .markup.bind import bind

        plan = bind(doc, layouts[doc.schema], tokens.tokenizer)
        if plan.next_position >= tokens.max_positions:
            raise PromptCacheError(f"prompt needs {plan.next_position} positions and leaves no room to generate; "
                                   f"{tokens.model}'s context window is {tokens.max_positions}")
        return FileResult(name, True, f"{head}, checked against it: {plan.next_position} positions of "
                                      f"{tokens.max_positions}, arguments fit their parameters)")
    except PromptCacheError as e:
        return FileResult(name, False, _error_line(e, name))


def _compile(schema, tokens: Tokens):
    from .markup.layout import compile_schema

    layout = compile_schema(schema, tokens.tokenizer, tokens.chat)
    if layout.length > tokens.max_positions:
        raise PromptCacheError(f"schema '{layout.name}' is {layout.length} positions long; {tokens.model}'s "
                               f"context window is {tokens.max_positions}")
    return layout


def _module_count(schema) -> int:
    from .markup.nodes import Module

    count, stack = 0, list(schema.children)
    while stack:
        node = stack.pop()
        count += isinstance(node, Module)
        stack.extend(getattr(node, "children", ()) or getattr(node, "members", ()) or ())
    return count


def _error_line(error: BaseException, name: str) -> str:
    """`file:line:col: message` for a SchemaError, `file: message` for the rest (the file is the culprit)."""
    from .cli import format_error
    from .errors import SchemaError

    line = format_error(error, name)
    return line if isinstance(error, SchemaError) else f"{name}: {line}"


def parse_file(name: str):
    """The `Schema` or `Prompt` in a PML file; raises SchemaError/OSError otherwise."""
    from .markup.parse import parse_prompt, parse_schema
    from .markup.xmlsafe import prolog_end, read_text_file

    text = read_text_file(Path(name), 8 << 20, what="PML file")
    start = prolog_end(text)
    return parse_prompt(name) if text.startswith("<prompt", start) else parse_schema(name)
