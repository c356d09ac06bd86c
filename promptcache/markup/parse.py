"""PML text -> typed nodes: `parse_schema`, `parse_prompt`, plus `is_pml` and `normalize_text`.

Every document goes through `xmlsafe` (bounded, DOCTYPE-free parse, then the RELAX NG grammar),
so by the time a tree reaches this module its shape is known to be right. What remains here is
what a grammar cannot say: unique names per scope, a union's scaffold being one of its members,
`src=` files staying inside the allowed directory, and how whitespace becomes `Text`.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lxml import etree

from promptcache.errors import SchemaError
from promptcache.markup.nodes import (
    ROLES,
    Module,
    Node,
    Param,
    Prompt,
    RoleBlock,
    Schema,
    Selection,
    Text,
    Union,
)
from promptcache.markup.xmlsafe import (
    NAME_RE,
    XML_SPACE,
    Document,
    load_document,
    parse_xml,
    prolog_end,
    read_text_file,
    validate,
)

__all__ = ["parse_schema", "parse_prompt", "is_pml", "normalize_text", "SRC_MAX_BYTES"]

SRC_MAX_BYTES = 4 << 20
_WS = " \t\r\n"  # XML whitespace; str.strip() would also eat no-break spaces


def is_pml(text: str) -> bool:
    """True when `text` is a PML document rather than a plain-text prompt.

    That is: after optional whitespace, an XML declaration and comments, it starts with a
    `<schema` or `<prompt` tag.
    """
    if not isinstance(text, str):
        return False
    start = prolog_end(text)
    for tag in ("<schema", "<prompt"):
        if text.startswith(tag, start):
            after = text[start + len(tag): start + len(tag) + 1]
            return after == "" or after in "/>" or after in _WS
    return False


def normalize_text(run: str, *, first: bool = True, last: bool = True) -> str:
    """Normalise one run of text between elements; "" means the run is dropped.

    Whitespace-only runs vanish. Otherwise the run is dedented (`textwrap.dedent`), its leading
    whitespace becomes "" when the run is the first child of its parent, else "\\n" when it held
    a newline, else " "; trailing whitespace likewise with "last". Inner whitespace is kept.

    Args:
        run: the raw text (CDATA and entities already resolved to characters).
        first: no element precedes the run in its parent.
        last: no element follows the run in its parent.
    """
    core = textwrap.dedent(run).strip(_WS)
    if not core:
        return ""
    lead = run[: len(run) - len(run.lstrip(_WS))]
    trail = run[len(run.rstrip(_WS)):]
    return _collapse(lead, first) + core + _collapse(trail, last)


def _collapse(space: str, at_edge: bool) -> str:
    if at_edge or not space:
        return ""
    return "\n" if "\n" in space else " "



def _load_root(source: str | os.PathLike, max_bytes: int, tag: str):
    """Read, parse and validate a document whose root must be `<tag>`."""
    doc = load_document(source, max_bytes)
    root = parse_xml(doc)
    validate(root, doc)
    if root.tag != tag:
        raise SchemaError(f"expected a <{tag}> document, got <{root.tag}>", root.sourceline, source=doc.name)
    return doc, root

def parse_schema(source: str | os.PathLike, *, base_dir: str | os.PathLike | None = None,
                 max_bytes: int = 8 << 20) -> Schema:
    """Parse a `<schema>` document into a `Schema`.

    Args:
        source: XML text (a `str` starting with "<") or a path to a file.
        base_dir: the only directory `src=` files may come from. Defaults to the schema file's
            directory; for XML text without it, any `src=` is refused.
        max_bytes: largest document accepted, checked before parsing.

    Raises:
        SchemaError: malformed, hostile or invalid document, with line and column when known.
    """
    doc, root = _load_root(source, max_bytes, "schema")
    if base_dir is None and doc.path is not None:
        base_dir = doc.path.parent
    build = _SchemaBuilder(doc, Path(base_dir) if base_dir is not None else None)
    children = build.children(root, _preserves(root, False))
    _check_scope(children, f"<schema name={root.get('name')!r}>", doc.name)
    return Schema(root.get("name"), children, source=str(doc.path) if doc.path else None)


def parse_prompt(source: str | os.PathLike, *, max_bytes: int = 1 << 20) -> Prompt:
    """Parse a `<prompt>` document into a `Prompt`.

    Whether the selected modules and parameters exist is the layout compiler's business; this
    checks structure only: selections first, then free text and chat turns.

    Raises:
        SchemaError: malformed, hostile or invalid document, with line and column when known.
    """
    doc, root = _load_root(source, max_bytes, "prompt")
    preserve = _preserves(root, False)
    selections: list[Selection] = []
    tail: list[Text | RoleBlock] = []
    for item, first, last in _items(root):
        if isinstance(item, _Run):
            tail += _text_nodes(item, first, last, preserve)
        elif item.tag in ROLES:
            tail.append(RoleBlock(item.tag, _turn_text(item, preserve), item.sourceline))
        else:
            selections.append(_selection(item, doc.name))
    return Prompt(root.get("schema"), tuple(selections), tuple(tail))


# ---- runs of text between elements -----------------------------------------------------------


@dataclass(frozen=True)
class _Run:
    """Text between two elements; comments and PIs inside it are invisible."""

    text: str
    line: int | None


def _items(el: etree._Element) -> list[tuple[_Run | etree._Element, bool, bool]]:
    """Children of `el` as (run or element, first, last); first/last: no element before/after."""
    items: list[_Run | etree._Element] = []
    pending, line = el.text or "", el.sourceline
    for child in el:
        if isinstance(child.tag, str):
            if pending:
                items.append(_Run(pending, max(1, child.sourceline - pending.count("\n"))))
            items.append(child)
            pending, line = "", child.sourceline
        pending += child.tail or ""
    if pending:
        items.append(_Run(pending, line))
    elements = [i for i, item in enumerate(items) if not isinstance(item, _Run)]
    lo, hi = (elements[0], elements[-1]) if elements else (len(items), -1)
    return [(item, i < lo, i > hi) for i, item in enumerate(items)]


def _text_nodes(run: _Run, first: bool, last: bool, preserve: bool) -> list[Text]:
    text = run.text if preserve else normalize_text(run.text, first=first, last=last)
    return [Text(text, run.line)] if text else []


def _preserves(el: etree._Element, inherited: bool) -> bool:
    """Whether `xml:space="preserve"` is in force on `el` (it switches normalisation off)."""
    return el.get(XML_SPACE, "preserve" if inherited else "default") == "preserve"


# ---- schema documents ------------------------------------------------------------------------


class _SchemaBuilder:
    """Turns a validated `<schema>` tree into nodes, reading `src=` files as it goes."""

    def __init__(self, doc: Document, base_dir: Path | None):
        self.doc, self.base_dir = doc, base_dir

    def children(self, el: etree._Element, preserve: bool) -> tuple[Node, ...]:
        nodes: list[Node] = []
        for item, first, last in _items(el):
            if isinstance(item, _Run):
                nodes += _text_nodes(item, first, last, preserve)
            else:
                nodes.append(self.node(item, preserve))
        return tuple(nodes)

    def node(self, el: etree._Element, inherited: bool) -> Node:
        preserve, line = _preserves(el, inherited), el.sourceline
        if el.tag == "parameter":
            return Param(el.get("name"), int(el.get("length")), el.get("scaffold"), line)
        if el.tag == "union":
            members = tuple(self.node(m, preserve) for m in el if m.tag == "module")
            return Union(members, el.get("scaffold"), line)  # type: ignore[arg-type]
        if el.tag == "module":
            children = self.src(el, preserve) if el.get("src") is not None else self.children(el, preserve)
            return Module(el.get("name"), children, el.get("cache", "true") == "true", line)
        assert el.tag in ROLES, el.tag  # the grammar admits nothing else
        return RoleBlock(el.tag, self.children(el, preserve), line)

    def src(self, el: etree._Element, preserve: bool) -> tuple[Node, ...]:
        """The text of a module's `src=` file, which must resolve inside `base_dir`."""
        src, name, line = el.get("src"), el.get("name"), el.sourceline
        what = f"src file {src!r} of module {name!r}"
        if self.base_dir is None:
            raise SchemaError(f"module {name!r} has src={src!r} but the schema was given as a "
                              "string: pass base_dir= to allow reading files", line, source=self.doc.name)
        base = os.path.realpath(self.base_dir)
        try:
            real = os.path.realpath(os.path.join(base, src))
            inside = os.path.commonpath([real, base]) == base
        except ValueError:  # different drives, NUL bytes
            inside = False
        if not inside:
            raise SchemaError(f"{what} resolves outside the allowed directory {str(self.base_dir)!r}",
                              line, source=self.doc.name)
        text = read_text_file(Path(real), SRC_MAX_BYTES, what=what, source=self.doc.name, line=line)
        # NOTE: a file is one run; no dedent, so code keeps every inner space exactly.
        text = text if preserve else text.strip(_WS)
        return (Text(text, line),) if text else ()


def _scope_members(children: Iterable[Node]) -> Iterable[Node]:
    """Nodes sharing a naming scope: roles are transparent, union members join their parent's."""
    for node in children:
        if isinstance(node, RoleBlock):
            yield from _scope_members(node.children)
        elif isinstance(node, Union):
            yield node
            yield from node.members
        else:
            yield node


def _check_scope(children: tuple[Node, ...], owner: str, source: str) -> None:
    """Unique module names per scope, unique parameters per module, scaffolds that exist."""
    modules: dict[str, Module] = {}
    params: dict[str, Param] = {}
    for node in _scope_members(children):
        if isinstance(node, Module):
            if node.name in modules:
                raise SchemaError(f"duplicate module name {node.name!r} in {owner} (first at line "
                                  f"{modules[node.name].line}); sibling modules, union members "
                                  "included, need distinct names", node.line, source=source)
            modules[node.name] = node
            _check_scope(node.children, f"module {node.name!r}", source)
        elif isinstance(node, Param):
            if node.name in params:
                raise SchemaError(f"duplicate parameter {node.name!r} in {owner} (first at line "
                                  f"{params[node.name].line})", node.line, source=source)
            params[node.name] = node
        elif isinstance(node, Union) and node.scaffold is not None:
            names = [m.name for m in node.members]
            if node.scaffold not in names:
                raise SchemaError(f"union scaffold {node.scaffold!r} is not one of its members: "
                                  f"{', '.join(names)}", node.line, source=source)


# ---- prompt documents ------------------------------------------------------------------------


def _selection(el: etree._Element, source: str) -> Selection:
    if not NAME_RE.fullmatch(el.tag):
        raise SchemaError(f"<{el.tag}> cannot select a module: module names use letters, digits, "
                          "'_', '.', '-'", el.sourceline, source=source)
    children = tuple(_selection(c, source) for c in el if isinstance(c.tag, str))
    return Selection(el.tag, tuple(el.attrib.items()), children, el.sourceline)


def _turn_text(el: etree._Element, inherited: bool) -> tuple[Text, ...]:
    """A chat turn's text (the grammar guarantees it holds nothing else)."""
    runs = [item for item, _, _ in _items(el) if isinstance(item, _Run)]
    if not runs:
        return ()
    return tuple(_text_nodes(runs[0], True, True, _preserves(el, inherited)))
