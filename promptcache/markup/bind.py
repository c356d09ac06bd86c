"""Bind a `Prompt` to a compiled schema: which modules' states to splice, which tokens are new.

Selection rules: the schema root (text outside modules) is always included; a module is included
only when selected, its children only when selected inside it; at most one member per union;
every parameter of a selected module needs an argument no longer than the parameter, which is
padded to the parameter's length with the schema's filler (a space by default).
"""

from __future__ import annotations

from ..errors import PromptError
from .layout import ROOT, PromptPlan, SchemaLayout, fill
from .nodes import Prompt, RoleBlock, Selection
from .tokens import Piece, encode_pieces, encode_text


def _scope_names(layout: SchemaLayout, parent: str) -> list[str]:
    return [layout.modules[p].name for p in layout.modules[parent].children]


def _select(layout: SchemaLayout, parent: str, sels: tuple[Selection, ...], chosen: dict, tok):
    where = f"module '{parent}'" if parent else "the top level"
    by_union: dict[int, str] = {}
    for sel in sels:
        path = f"{parent}/{sel.name}" if parent else sel.name
        if path not in layout.modules or path == ROOT:
            valid = ", ".join(_scope_names(layout, parent)) or "(none)"
            raise PromptError(f"unknown module '{sel.name}' at {where} of schema '{layout.name}'; "
                              f"valid modules there: {valid}")
        if path in chosen:
            raise PromptError(f"module '{path}' is selected twice in the prompt")
        mod = layout.modules[path]
        if mod.union is not None:
            if mod.union in by_union:
                members = ", ".join(layout.modules[m].name for m in layout.unions[mod.union].members)
                raise PromptError(f"modules '{by_union[mod.union]}' and '{sel.name}' are members of one union; "
                                  f"select at most one of: {members}")
            by_union[mod.union] = sel.name
        chosen[path] = _arguments(layout, path, sel, tok)
        _select(layout, path, sel.children, chosen, tok)


def _arguments(layout: SchemaLayout, path: str, sel: Selection, tok) -> dict[str, tuple[int, ...]]:
    slots = layout.modules[path].slots
    args = dict(sel.args)
    for name in args:
        if name not in slots:
            valid = ", ".join(slots) or "(none)"
            raise PromptError(f"module '{path}' has no parameter '{name}'; its parameters: {valid}")
    missing = [n for n in slots if n not in args]
    if missing:
        raise PromptError(f"module '{path}' needs an argument for parameter(s) {', '.join(missing)}; "
                          f"write them as attributes, e.g. <{sel.name} {missing[0]}=\"...\"/>")
    out = {}
    for name, value in args.items():
        ids = encode_text(tok, value)
        if len(ids) > slots[name].length:
            raise PromptError(f"argument for parameter '{name}' of module '{path}' is {len(ids)} tokens; "
                              f"the parameter's length is {slots[name].length} tokens")
        out[name] = ids
    return out


def _tail_pieces(layout: SchemaLayout, prompt: Prompt) -> list[Piece]:
    """The prompt's own text and turns, as the chat format renders them after the schema (markers
    and text apart: the text is tokenized as text).

    A turn continues the schema's chat state (a user turn right after the schema's closing system
    turn opens as the format says it does there); the generation prompt follows when the last
    turn, the prompt's or else the schema's, is a user or system turn with only whitespace after it.
    """
    chat = layout.chat
    parts, after_system, last_role = [], layout.ends_after_system, layout.trailing_role
    for node in prompt.tail:
        if isinstance(node, RoleBlock):
            text = "".join(t.text for t in node.children)
            parts += [Piece(chat.opener(node.role, after_system), True), Piece(text, False),
                      Piece(chat.roles[node.role][1], True)]
            after_system, last_role = node.role == "system", node.role
        else:
            parts.append(Piece(node.text, False))
            if node.text.strip():
                after_system, last_role = False, None
    if last_role in ("user", "system"):
        parts.append(Piece(chat.generation_prompt, True))
    return parts


def bind(prompt: Prompt, layout: SchemaLayout, tokenizer, *, pad_arguments: bool = True) -> PromptPlan:
    """Resolve `prompt` against `layout` (raises PromptError naming the culprit).

    `pad_arguments`: an argument shorter than its parameter is followed by the layout's filler
    tokens up to the parameter's length, so a parameter is always `length` tokens, as it was
    encoded (no gap in positions; an argument equal to the scaffold is exact). False leaves the
    rest of the slot as a gap.
    """
    if prompt.schema != layout.name:
        raise PromptError(f"prompt is for schema '{prompt.schema}', not '{layout.name}'")
    chosen: dict[str, dict] = {ROOT: {}}
    _select(layout, ROOT, prompt.selections, chosen, tokenizer)
    cached, pieces = [], []   # pieces: (position, token, is_new)
    for path in sorted(chosen, key=lambda p: (layout.modules[p].start, p.count("/"))):
        mod = layout.modules[path]
        new = not mod.cache
        if not new and mod.token_ids:  # an empty module (e.g. a "none" union member) has no states
            cached.append(path)
        pieces.extend((p, t, new) for t, p in zip(mod.token_ids, mod.positions))
        for name, ids in chosen[path].items():
            slot = mod.slots[name]
            if pad_arguments:
                ids = ids + fill(layout.filler, slot.length - len(ids))
            pieces.extend((slot.start + i, t, True) for i, t in enumerate(ids))
    tail = encode_pieces(tokenizer, _tail_pieces(layout, prompt))
    pieces.extend((layout.length + i, t, True) for i, t in enumerate(tail))
    pieces.sort(key=lambda x: x[0])
    new = [(p, t) for p, t, is_new in pieces if is_new]
    return PromptPlan(
        schema=layout.name, modules=tuple(chosen), cached=tuple(cached),
        new_token_ids=tuple(t for _, t in new), new_positions=tuple(p for p, _ in new),
        token_ids=tuple(t for _, t, _ in pieces), positions=tuple(p for p, _, _ in pieces),
        next_position=layout.length + len(tail), stop=layout.chat.stop,
    )
