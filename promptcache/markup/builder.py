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

import operator
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..errors import PromptCacheError
from .check import SchemaRules, check_prompt, check_schema, check_selections
from .nodes import Module, Node, Param, Prompt, RoleBlock, Schema, Selection, Text, Union

__all__ = ["SchemaBuilder", "make_prompt", "prompt_to_xml", "schema_to_xml", "select"]

_XML_ILLEGAL = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _append_text(children: list, text: str) -> None:
    """Add text, merged with a preceding Text (as one XML run would be); "" adds nothing."""
    if text == "":
        return
    if isinstance(text, str) and children and isinstance(children[-1], Text):
        children[-1] = Text(children[-1].text + text)
    else:
        children.append(Text(text))


@dataclass
class _Frame:
    """An open element ("schema", "module", "union" or a role) and its children so far."""

    kind: str
    children: list = field(default_factory=list)


class SchemaBuilder:
    """Builds a `Schema` node by node; see the module docstring for an example.

    `text` and `parameter` return the builder, so calls chain; `module`, `union` and `role` are
    context managers. Each call is checked at once by the same rules as parsed PML
    (`check.SchemaRules`), raising `SchemaError` at the call that breaks one: names and their
    uniqueness per scope (union members share their parent's scope, roles are transparent),
    parameters only inside a module, only modules inside a union, a union's scaffold among its
    members, parameter lengths in 1..4096, roles never nested.
    """

    def __init__(self, name: str):
        self._rules = SchemaRules(name)
        self.name = name
        self._stack = [_Frame("schema")]

    @property
    def _top(self) -> _Frame:
        return self._stack[-1]

    def text(self, text: str) -> SchemaBuilder:
        """Append literal text, verbatim, to the innermost open element."""
        self._rules.add(Text(text))
        _append_text(self._top.children, text)
        return self

    def parameter(self, name: str, length: int, scaffold: str | None = None) -> SchemaBuilder:
        """Append a parameter slot of `length` tokens to the innermost module.

        Args:
            name: unique among the module's parameters.
            length: slot size in tokens, 1..4096 (an int, or an integer such as numpy's).
            scaffold: text encoded in the slot when the module is precomputed (None: filler tokens).
        """
        param = Param(name, _integer(length), scaffold)
        self._rules.add(param)
        self._top.children.append(param)
        return self

    @contextmanager
    def module(self, name: str, cache: bool = True) -> Iterator[SchemaBuilder]:
        """Open a module; its content is whatever is added inside the `with` block."""
        frame = yield from self._open(Module(name, (), cache))
        self._top.children.append(Module(name, tuple(frame.children), cache))

    @contextmanager
    def union(self, scaffold: str | None = None) -> Iterator[SchemaBuilder]:
        """Open a union of mutually exclusive modules; `scaffold` names the member encoded as the
        context for what follows (default: the longest member)."""
        frame = yield from self._open(Union((), scaffold))
        self._top.children.append(Union(tuple(frame.children), scaffold))

    @contextmanager
    def role(self, role: str) -> Iterator[SchemaBuilder]:
        """Open a `system`, `user` or `assistant` block, rendered in the model's chat format."""
        frame = yield from self._open(RoleBlock(role, ()))  # type: ignore[arg-type]
        self._top.children.append(RoleBlock(role, tuple(frame.children)))  # type: ignore[arg-type]

    def _open(self, node: Module | Union | RoleBlock) -> Iterator[SchemaBuilder]:
        """Check and enter `node` for the body of a `with` block; leave it when the block ends
        normally, and return its frame."""
        self._rules.open(node)
        frame = _Frame(node.role if isinstance(node, RoleBlock) else type(node).__name__.lower())
        self._stack.append(frame)
        yield self
        popped = self._stack.pop()
        assert popped is frame, "builder contexts closed out of order"
        self._rules.close()
        return frame

    def build(self) -> Schema:
        """The finished `Schema`; raises if a `with` block is still open."""
        if len(self._stack) > 1:
            open_ = " > ".join(f.kind for f in self._stack[1:])
            raise PromptCacheError(f"cannot build schema {self.name!r}: still inside {open_}; "
                                   "call build() after the `with` blocks end")
        return Schema(self.name, tuple(self._top.children))


def _integer(value: object) -> object:
    """numpy and other integer types as a plain int; anything else as given, for the checker."""
    if isinstance(value, (bool, int)):
        return value
    try:
        return operator.index(value)
    except TypeError:
        return value


# ---- prompts ---------------------------------------------------------------------------------


def select(name: str, /, *children: Selection, **args: str | int) -> Selection:
    """A module selection: `select("trip", select("overseas"), duration="3")`.

    Arguments fill the module's parameters; integers are written as decimal text.
    """
    pairs = tuple((key, value if isinstance(value, str) else _decimal(value)) for key, value in args.items())
    selection = Selection(name, pairs, children)
    check_selections((selection,))
    return selection


def _decimal(value: object) -> object:
    """An integer (not a bool) as decimal text; anything else unchanged, for the checker."""
    number = _integer(value)
    return str(number) if isinstance(number, int) and not isinstance(number, bool) else value


def make_prompt(schema_name: str, *selections: Selection, text: str | None = None,
                turns: Sequence[tuple[str, str] | Mapping[str, str]] = ()) -> Prompt:
    """A `Prompt` of module selections, then optional free `text`, then chat `turns`.

    Args:
        schema_name: the schema the prompt is for.
        *selections: from `select`.
        text: free text placed after the selections (verbatim).
        turns: `(role, content)` pairs or `{"role": ..., "content": ...}` messages.

    Raises:
        SchemaError: from `check_prompt`, naming what is wrong.
    """
    tail: list = []
    if text is not None:
        _append_text(tail, text)
    for turn in turns:
        if isinstance(turn, Mapping):
            role, content = turn.get("role"), turn.get("content")
        elif isinstance(turn, Sequence) and not isinstance(turn, str) and len(turn) == 2:
            role, content = turn
        else:
            raise PromptCacheError("turns must be (role, content) pairs or {'role': ..., 'content': ...} "
                                   f"mappings, got {type(turn).__name__}")
        body: list = []
        _append_text(body, content)
        tail.append(RoleBlock(role, tuple(body)))
    return check_prompt(Prompt(schema_name, tuple(selections), tuple(tail)))


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
    assert isinstance(node, RoleBlock), type(node)  # the writers check their trees first
    return f"<{node.role}>{_nodes_xml(node.children)}</{node.role}>"


def _nodes_xml(nodes: Sequence[Node]) -> str:
    return "".join(_node_xml(n) for n in nodes)


def schema_to_xml(schema: Schema) -> str:
    """PML text for `schema`, such that `parse_schema(schema_to_xml(schema)) == schema`."""
    check_schema(schema)
    head = _attrs([("name", schema.name), ("xml:space", "preserve")])
    return f"<schema{head}>{_nodes_xml(schema.children)}</schema>\n"


def _selection_xml(sel: Selection) -> str:
    attrs = _attrs(sel.args)
    if not sel.children:
        return f"<{sel.name}{attrs}/>"
    return f"<{sel.name}{attrs}>{''.join(_selection_xml(c) for c in sel.children)}</{sel.name}>"


def prompt_to_xml(prompt: Prompt) -> str:
    """PML text for `prompt`, such that `parse_prompt(prompt_to_xml(prompt)) == prompt`."""
    check_prompt(prompt)
    parts = [_selection_xml(s) for s in prompt.selections]
    parts += [_node_xml(node) for node in prompt.tail]
    head = _attrs([("schema", prompt.schema), ("xml:space", "preserve")])
    return f"<prompt{head}>{''.join(parts)}</prompt>\n"
