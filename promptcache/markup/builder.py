"""Build PML schemas and prompts in Python, and write any of them back out as PML text.

`SchemaBuilder` produces exactly the `Schema` tree `parse_schema` would produce for the same
document, and checks the same rules eagerly, at the call that breaks them:

    b = SchemaBuilder("travel")
    b.text("You are a travel planner.")
    with b.module("trip"):
        b.text("Plan a trip lasting ").parameter("duration", length=4).text(" days.")
        with b.union(scaffold="overseas"):
            with b.module("domestic"):
                b.text("Stay in the country.")
            with b.module("overseas", cache=False):
                b.text("Bring a passport.")
    schema = b.build()
    xml = schema_to_xml(schema)       # parse_schema(xml) == schema

Builder text is verbatim: nothing is stripped or collapsed. The XML writer therefore marks its
documents `xml:space="preserve"`, writes no indentation, and escapes `<`, `>`, `&` (and CR), so
code and odd whitespace survive a round trip.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..errors import PromptCacheError
from .nodes import ROLES, Module, Node, Param, Prompt, RoleBlock, Schema, Selection, Text, Union
from .xmlsafe import MAX_PARAM_LENGTH, NAME_RE, RESERVED

__all__ = ["SchemaBuilder", "make_prompt", "prompt_to_xml", "schema_to_xml", "select"]

_XML_ILLEGAL = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name in RESERVED:
        raise PromptCacheError(f"invalid {what} name {name!r}: use letters, digits, '_', '.', '-' "
                               f"(not starting with a digit, '.' or '-'), and not a reserved word "
                               f"({', '.join(sorted(RESERVED))})")
    return name


def _check_document_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise PromptCacheError(f"invalid {what} name {name!r}: it must be non-empty, "
                               "without leading or trailing whitespace")
    return name


def _append_text(children: list, text: object) -> None:
    """Add text, merged with a preceding Text (as one XML run would be); "" adds nothing."""
    if not isinstance(text, str):
        raise PromptCacheError(f"text must be a str, got {type(text).__name__}: {text!r}")
    if not text:
        return
    if children and isinstance(children[-1], Text):
        children[-1] = Text(children[-1].text + text)
    else:
        children.append(Text(text))


@dataclass
class _Scope:
    """Names already used in one naming scope (the schema root or one module)."""

    owner: str
    modules: set[str] = field(default_factory=set)
    params: set[str] | None = None  # None: parameters are not allowed here (the root)


@dataclass
class _Frame:
    """An open element: "schema", "module", "union" or a role; its children so far."""

    kind: str
    scope: _Scope
    children: list = field(default_factory=list)


class SchemaBuilder:
    """Builds a `Schema` node by node; see the module docstring for an example.

    `text` and `parameter` return the builder, so calls chain; `module`, `union` and `role` are
    context managers. Every rule the PML parser enforces is checked at once, raising
    `PromptCacheError`: names and their uniqueness per scope (union members share their parent's
    scope, roles are transparent), parameters only inside a module, only modules inside a union,
    a union's scaffold among its members, parameter lengths in 1..4096, roles never nested.
    """

    def __init__(self, name: str):
        self.name = _check_document_name(name, "schema")
        self._stack = [_Frame("schema", _Scope(f"schema {name!r}"))]

    @property
    def _top(self) -> _Frame:
        return self._stack[-1]

    def _content_allowed(self, what: str) -> None:
        if self._top.kind == "union":
            raise PromptCacheError(f"a union holds only modules, not {what}; "
                                   "wrap it in `with builder.module(...)`")

    def text(self, text: str) -> SchemaBuilder:
        """Append literal text, verbatim, to the innermost open element."""
        self._content_allowed(f"text ({text!r})")
        _append_text(self._top.children, text)
        return self

    def parameter(self, name: str, length: int, scaffold: str | None = None) -> SchemaBuilder:
        """Append a parameter slot of `length` tokens to the innermost module.

        Args:
            name: unique among the module's parameters.
            length: slot size in tokens, 1..4096.
            scaffold: text encoded in the slot when the module is precomputed (None: filler tokens).
        """
        self._content_allowed(f"parameter {name!r}")
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise PromptCacheError(f"invalid parameter name {name!r}: use letters, digits, '_', '.', '-'")
        scope = self._top.scope
        if scope.params is None:
            raise PromptCacheError(f"parameter {name!r} is outside any module; parameters belong to a "
                                   "module (open one with `with builder.module(...)`)")
        if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= MAX_PARAM_LENGTH:
            raise PromptCacheError(f"parameter {name!r} has length {length!r}; "
                                   f"expected an int from 1 to {MAX_PARAM_LENGTH}")
        if scaffold is not None and not isinstance(scaffold, str):
            raise PromptCacheError(f"parameter {name!r} scaffold must be a str or None, got {scaffold!r}")
        if name in scope.params:
            raise PromptCacheError(f"duplicate parameter {name!r} in {scope.owner}")
        scope.params.add(name)
        self._top.children.append(Param(name, length, scaffold))
        return self

    @contextmanager
    def module(self, name: str, cache: bool = True) -> Iterator[SchemaBuilder]:
        """Open a module; its content is whatever is added inside the `with` block."""
        _check_name(name, "module")
        scope = self._top.scope
        if name in scope.modules:
            raise PromptCacheError(f"duplicate module name {name!r} in {scope.owner}; sibling modules, "
                                   "union members included, need distinct names")
        if not isinstance(cache, bool):
            raise PromptCacheError(f"module {name!r}: cache must be True or False, got {cache!r}")
        scope.modules.add(name)
        frame = _Frame("module", _Scope(f"module {name!r}", params=set()))
        yield from self._open(frame)
        self._top.children.append(Module(name, tuple(frame.children), cache))

    @contextmanager
    def union(self, scaffold: str | None = None) -> Iterator[SchemaBuilder]:
        """Open a union of mutually exclusive modules; `scaffold` names the member encoded as the
        context for what follows (default: the first)."""
        self._content_allowed("a nested union")
        if scaffold is not None:
            _check_name(scaffold, "scaffold module")
        frame = _Frame("union", self._top.scope)
        yield from self._open(frame)
        names = [m.name for m in frame.children]
        if not names:
            raise PromptCacheError("a union needs at least one module")
        if scaffold is not None and scaffold not in names:
            raise PromptCacheError(f"union scaffold {scaffold!r} is not one of its members: "
                                   f"{', '.join(names)}")
        self._top.children.append(Union(tuple(frame.children), scaffold))

    @contextmanager
    def role(self, role: str) -> Iterator[SchemaBuilder]:
        """Open a `system`, `user` or `assistant` block, rendered in the model's chat format."""
        if role not in ROLES:
            raise PromptCacheError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        self._content_allowed(f"a <{role}> block")
        outer = next((f.kind for f in self._stack if f.kind in ROLES), None)
        if outer is not None:
            raise PromptCacheError(f"<{role}> cannot be inside <{outer}>: roles do not nest")
        frame = _Frame(role, self._top.scope)
        yield from self._open(frame)
        self._top.children.append(RoleBlock(role, tuple(frame.children)))  # type: ignore[arg-type]

    def _open(self, frame: _Frame) -> Iterator[SchemaBuilder]:
        """Push `frame` for the body of a `with` block; pop it when the block ends normally."""
        self._stack.append(frame)
        yield self
        popped = self._stack.pop()
        assert popped is frame, "builder contexts closed out of order"

    def build(self) -> Schema:
        """The finished `Schema`; raises if a `with` block is still open."""
        if len(self._stack) > 1:
            open_ = " > ".join(f.kind for f in self._stack[1:])
            raise PromptCacheError(f"cannot build schema {self.name!r}: still inside {open_}; "
                                   "call build() after the `with` blocks end")
        return Schema(self.name, tuple(self._top.children))


# ---- prompts ---------------------------------------------------------------------------------


def select(name: str, /, *children: Selection, **args: str | int) -> Selection:
    """A module selection: `select("trip", select("overseas"), duration="3")`.

    Arguments fill the module's parameters; ints are written as decimal text.
    """
    _check_name(name, "module")
    for child in children:
        if not isinstance(child, Selection):
            raise PromptCacheError(f"selection {name!r}: children must be Selections (use select()), "
                                   f"got {child!r}")
    pairs = []
    for key, value in args.items():
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise PromptCacheError(f"argument {key!r} of {name!r} must be a str (or int), got {value!r}")
        pairs.append((key, str(value)))
    return Selection(name, tuple(pairs), tuple(children))


def make_prompt(schema_name: str, *selections: Selection, text: str | None = None,
                turns: Sequence[tuple[str, str] | Mapping[str, str]] = ()) -> Prompt:
    """A `Prompt` of module selections, then optional free `text`, then chat `turns`.

    Args:
        schema_name: the schema the prompt is for.
        *selections: from `select`.
        text: free text placed after the selections (verbatim).
        turns: `(role, content)` pairs or `{"role": ..., "content": ...}` messages.
    """
    _check_document_name(schema_name, "schema")
    for sel in selections:
        if not isinstance(sel, Selection):
            raise PromptCacheError(f"prompt selections must be Selections (use select()), got {sel!r}")
    tail: list = []
    if text is not None:
        _append_text(tail, text)
    for turn in turns:
        role, content = (turn.get("role"), turn.get("content")) if isinstance(turn, Mapping) else turn
        if role not in ROLES:
            raise PromptCacheError(f"unknown role {role!r} in prompt turns; "
                                   f"expected one of {', '.join(ROLES)}")
        body: list = []
        _append_text(body, content)
        tail.append(RoleBlock(role, tuple(body)))
    return Prompt(schema_name, tuple(selections), tuple(tail))


# ---- writing PML -----------------------------------------------------------------------------


def _escape(text: str, attribute: bool = False) -> str:
    bad = _XML_ILLEGAL.search(text)
    if bad:
        raise PromptCacheError(f"character {bad.group()!r} at offset {bad.start()} of {text[:40]!r} "
                               "cannot be written in XML 1.0; remove it first")
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\r", "&#13;")
    if attribute:  # attribute-value normalisation would turn these into spaces
        text = text.replace('"', "&quot;").replace("\n", "&#10;").replace("\t", "&#9;")
    return text


def _attrs(pairs: Sequence[tuple[str, str | None]]) -> str:
    return "".join(f' {key}="{_escape(value, attribute=True)}"' for key, value in pairs if value is not None)


def _node_xml(node: Node) -> str:
    if isinstance(node, Text):
        return _escape(node.text)
    if isinstance(node, Param):
        attrs = _attrs([("name", node.name), ("length", str(node.length)), ("scaffold", node.scaffold)])
        return f"<parameter{attrs}/>"
    if isinstance(node, Module):
        attrs = _attrs([("name", node.name), ("cache", None if node.cache else "false")])
        return f"<module{attrs}>{_nodes_xml(node.children)}</module>"
    if isinstance(node, Union):
        return f"<union{_attrs([('scaffold', node.scaffold)])}>{_nodes_xml(node.members)}</union>"
    if isinstance(node, RoleBlock):
        return f"<{node.role}>{_nodes_xml(node.children)}</{node.role}>"
    raise PromptCacheError(f"not a PML node: {node!r}")


def _nodes_xml(nodes: Sequence[Node]) -> str:
    return "".join(_node_xml(n) for n in nodes)


def schema_to_xml(schema: Schema) -> str:
    """PML text for `schema`, such that `parse_schema(schema_to_xml(schema)) == schema`."""
    head = _attrs([("name", schema.name), ("xml:space", "preserve")])
    return f"<schema{head}>{_nodes_xml(schema.children)}</schema>\n"


def _selection_xml(sel: Selection) -> str:
    attrs = _attrs(sel.args)
    if not sel.children:
        return f"<{sel.name}{attrs}/>"
    return f"<{sel.name}{attrs}>{''.join(_selection_xml(c) for c in sel.children)}</{sel.name}>"


def prompt_to_xml(prompt: Prompt) -> str:
    """PML text for `prompt`, such that `parse_prompt(prompt_to_xml(prompt)) == prompt`."""
    parts = [_selection_xml(s) for s in prompt.selections]
    for node in prompt.tail:
        if isinstance(node, RoleBlock) and not all(isinstance(c, Text) for c in node.children):
            raise PromptCacheError(f"a prompt's <{node.role}> turn holds text only, got {node.children!r}")
        parts.append(_node_xml(node))
    head = _attrs([("schema", prompt.schema), ("xml:space", "preserve")])
    return f"<prompt{head}>{''.join(parts)}</prompt>\n"
