"""Check a prompt against a schema without a model: what `promptcache validate` can know.

`bind` does the same checks (and more: argument lengths in tokens) when a prompt is run; this
one needs no tokenizer, so a prompt naming a missing module, selecting two members of one union or
leaving out a parameter's argument fails at validation, not after a model has loaded.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import SchemaError
from .nodes import Module, Param, Prompt, RoleBlock, Schema, Selection, Union


def _scope(children: Sequence) -> dict[str, tuple[Module, int | None]]:
    """Modules selectable among `children`: name -> (module, index of its union or None)."""
    out: dict[str, tuple[Module, int | None]] = {}
    for i, node in enumerate(children):
        if isinstance(node, Module):
            out[node.name] = (node, None)
        elif isinstance(node, Union):
            out.update({m.name: (m, i) for m in node.members})
        elif isinstance(node, RoleBlock):
            out.update(_scope(node.children))
    return out


def _params(module: Module) -> list[str]:
    names, stack = [], list(module.children)
    while stack:
        node = stack.pop()
        if isinstance(node, Param):
            names.append(node.name)
        elif isinstance(node, RoleBlock):
            stack.extend(node.children)
    return names


def check_prompt_against(prompt: Prompt, schemas: Sequence[Schema]) -> None:
    """Raise SchemaError (naming the module, union or parameter) unless `prompt` fits its schema."""
    schema = next((s for s in schemas if s.name == prompt.schema), None)
    if schema is None:
        given = ", ".join(sorted(s.name for s in schemas)) or "(none)"
        raise SchemaError(f"prompt is for schema '{prompt.schema}'; schemas given: {given}")
    stack: list[tuple[Sequence[Selection], Sequence, str]] = [(prompt.selections, schema.children, "")]
    while stack:
        selections, children, parent = stack.pop()
        scope, unions = _scope(children), {}
        where = f"module '{parent}'" if parent else "the top level"
        for sel in selections:
            if sel.name not in scope:
                valid = ", ".join(scope) or "(none)"
                raise SchemaError(f"unknown module '{sel.name}' at {where} of schema '{schema.name}'; "
                                  f"valid modules there: {valid}", sel.line)
            module, union = scope[sel.name]
            if union is not None and unions.setdefault(union, sel.name) != sel.name:
                raise SchemaError(f"modules '{unions[union]}' and '{sel.name}' are members of one union; "
                                  "select at most one", sel.line)
            params, given = _params(module), [name for name, _ in sel.args]
            unknown = [n for n in given if n not in params]
            if unknown:
                raise SchemaError(f"module '{sel.name}' has no parameter '{unknown[0]}'; its parameters: "
                                  f"{', '.join(params) or '(none)'}", sel.line)
            missing = [n for n in params if n not in given]
            if missing:
                raise SchemaError(f"module '{sel.name}' needs an argument for parameter(s) {', '.join(missing)}",
                                  sel.line)
            stack.append((sel.children, module.children, f"{parent}/{sel.name}" if parent else sel.name))
