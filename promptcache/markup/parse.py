"""PML text -> typed nodes: `parse_schema`, `parse_prompt`, plus `is_pml` and `normalize_text`.

Every document goes through `xmlsafe` (bounded, DOCTYPE-free parse), becomes typed nodes here,
and is then checked by `check`, the same checker that Python-built schemas and prompts go through.
What is decided here is only what markup alone can get wrong (attributes, text where no node has
room, `src=` files staying inside the allowed directory) and how whitespace becomes `Text`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lxml import etree

from promptcache.errors import SchemaError
from promptcache.markup import rules
from promptcache.markup.check import check_prompt, check_schema
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
from promptcache.markup.rules import XML_SPACE, Foreign, Where, display
from promptcache.markup.whitespace import INLINE, LAYOUT, ROLE, TextRun, normalize_content, verbatim_marks
from promptcache.markup.xmlsafe import (
    Document,
    attributes,
    load_document,
    parse_xml,
    prolog_end,
    read_text_file,
)

__all__ = ["parse_schema", "parse_prompt", "is_pml", "normalize_text", "SRC_MAX_BYTES"]

SRC_MAX_BYTES = 4 << 20
_WS = " \t\r\n"  # XML whitespace; str.strip() would also eat no-break spaces
_ELEMENTS = frozenset({"module", "union", "parameter", *ROLES})  # PML elements inside a schema


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
    """What one run of typed text becomes under PML's whitespace rules (`markup.whitespace`).

    The run is dedented by its own common indentation; literal whitespace at its start is removed
    when `first` (nothing precedes it in its element) and at its end when `last`. The parser applies
    the same rules to all runs of an element at once, with verbatim characters (CDATA, character
    references) exempt.

    Args:
        run: the raw text.
        first: no element precedes the run in its parent (else an inline element such as a module).
        last: no element follows the run in its parent.
    """
    items = ([] if first else [INLINE]) + [TextRun(run)] + ([] if last else [INLINE])
    return normalize_content(items)[0]


def _load_root(source: str | os.PathLike, max_bytes: int, tag: str):
    """Read and parse a document whose root must be `<tag>`; return it, its root and a `Where`."""
    doc = load_document(source, max_bytes)
    root = parse_xml(doc)
    where = Where(doc.name, doc.text, root.sourceline)
    if root.tag != tag:
        raise where.error(rules.document_element(root.tag, tag), root.sourceline, display(root.tag))
    _check_attributes(root, where)
    return doc, root, where


def _check_attributes(el: etree._Element, where: Where) -> None:
    problem = rules.attribute_problem(el.tag, el.attrib)
    if problem:
        raise where.error(problem, el.sourceline, el.tag)

def parse_schema(source: str | os.PathLike, *, base_dir: str | os.PathLike | None = None,
                 max_bytes: int = 8 << 20) -> Schema:
    """Parse a `<schema>` document into a `Schema`.

    Args:
        source: XML text (a `str` starting with "<") or a path to a file.
        base_dir: the only directory `src=` files may come from. Defaults to the schema file's
            directory; for XML text without it, any `src=` is refused.
        max_bytes: largest document accepted, checked before parsing; the document and every
            `src=` file it reads count against it together (each file is read once per mention).

    Raises:
        SchemaError: malformed, hostile or invalid document, with line and column when known.
    """
    doc, root, where = _load_root(source, max_bytes, "schema")
    if base_dir is None and doc.path is not None:
        base_dir = doc.path.parent
    build = _SchemaBuilder(doc, Path(base_dir) if base_dir is not None else None, where)
    build.budget = BudgetLeft(max_bytes, max_bytes - len(doc.text.encode("utf-8", "surrogatepass")))
    build.marks = verbatim_marks(doc.text, root)
    children = build.children(root, _preserves(root, False))
    schema = Schema(root.get("name"), children, source=str(doc.path) if doc.path else None)
    return check_schema(schema, where=where)


def parse_prompt(source: str | os.PathLike, *, max_bytes: int = 1 << 20) -> Prompt:
    """Parse a `<prompt>` document into a `Prompt`.

    Whether the selected modules and parameters exist is the layout compiler's business; this
    checks structure only: selections first, then free text and chat turns.

    Raises:
        SchemaError: malformed, hostile or invalid document, with line and column when known.
    """
    doc, root, where = _load_root(source, max_bytes, "prompt")
    marks = verbatim_marks(doc.text, root)
    preserve = _preserves(root, False)
    selections: list[Selection] = []
    tail: list[Text | RoleBlock] = []
    started: str | None = None  # what began the free-text tail, for messages
    for item, first, last in _items(root, marks):
        if isinstance(item, _Run):
            tail += _text_nodes(item, first, last, preserve)
            if started is None and item.text.strip(_WS):
                started = rules.tail_start(item.text)
        elif item.tag in ROLES:
            started = started or rules.tail_start(None, item.tag, item.sourceline)
            tail.append(_turn(item, preserve, where, marks))
        elif started:
            tag = display(item.tag)
            raise where.error(rules.selection_after_tail(tag, started), item.sourceline, tag)
        else:
            selections.append(_selection(item, where))
    retrieve = root.get("retrieve")
    retrieve = None if retrieve is None else rules.xml_int(retrieve)
    return check_prompt(Prompt(root.get("schema"), tuple(selections), tuple(tail), retrieve), where=where)


# ---- runs of text between elements -----------------------------------------------------------


@dataclass(frozen=True)
class _Run:
    """Text between two elements; comments and PIs inside it are invisible.

    `norm` is the text under the default whitespace rules (`markup.whitespace`), which depend on
    the element's other runs and on the elements around the run.
    """

    text: str
    line: int | None
    verbatim: frozenset[int] = frozenset()
    norm: str = ""


def _items(el: etree._Element, marks: dict | None = None) -> list[tuple[_Run | etree._Element, bool, bool]]:
    """Children of `el` as (run or element, first, last); first/last: no element before/after.

    `marks`: `whitespace.verbatim_marks` of the document (None: every character literal).
    """
    slots = iter((marks or {}).get(el) or ())
    items: list[_Run | etree._Element] = []
    pending, line = el.text or "", el.sourceline
    for child in el:
        if isinstance(child.tag, str):
            verbatim = next(slots, frozenset())
            if pending:
                items.append(_Run(pending, max(1, child.sourceline - pending.count("\n")), verbatim))
            items.append(child)
            pending, line = "", child.sourceline
        pending += child.tail or ""
    if pending:
        items.append(_Run(pending, line, next(slots, frozenset())))
    items = _normalized(el, items)
    elements = [i for i, item in enumerate(items) if not isinstance(item, _Run)]
    lo, hi = (elements[0], elements[-1]) if elements else (len(items), -1)
    return [(item, i < lo, i > hi) for i, item in enumerate(items)]


def _normalized(el: etree._Element, items: list) -> list:
    """`items` with each run's `norm` filled in (see `markup.whitespace`)."""
    def kind(child: etree._Element) -> str:
        if child.tag in ROLES:
            return ROLE
        return LAYOUT if el.tag == "prompt" else INLINE  # a prompt's other children are selections

    content = [TextRun(x.text, x.verbatim) if isinstance(x, _Run) else kind(x) for x in items]
    texts = iter(normalize_content(content))
    return [_Run(x.text, x.line, x.verbatim, next(texts)) if isinstance(x, _Run) else x for x in items]


def _text_nodes(run: _Run, first: bool, last: bool, preserve: bool) -> list[Text]:
    text = run.text if preserve else run.norm
    return [Text(text, run.line)] if text else []


def _has_content(el: etree._Element) -> bool:
    """Whether `el` holds an element or non-whitespace text (comments and PIs do not count)."""
    texts = [el.text, *(c.tail for c in el)]
    return any(isinstance(c.tag, str) for c in el) or any(t and t.strip(_WS) for t in texts)


def _preserves(el: etree._Element, inherited: bool) -> bool:
    """Whether `xml:space="preserve"` is in force on `el` (it switches normalisation off)."""
    return el.get(XML_SPACE, "preserve" if inherited else "default") == "preserve"


# ---- schema documents ------------------------------------------------------------------------


@dataclass
class BudgetLeft:
    """Bytes a schema may still read: the document and its `src=` files share `total`."""

    total: int
    left: int


class _SchemaBuilder:
    """Turns a parsed `<schema>` tree into nodes (judged afterwards by `check`), reading `src=` files."""

    def __init__(self, doc: Document, base_dir: Path | None, where: Where):
        self.doc, self.base_dir, self.where = doc, base_dir, where
        self.marks: dict | None = None  # whitespace.verbatim_marks of the document
        self.budget = BudgetLeft(1 << 62, 1 << 62)  # bytes `src=` files may still add (parse_schema sets it)

    def children(self, el: etree._Element, preserve: bool) -> tuple[Node, ...]:
        nodes: list[Node] = []
        for item, first, last in _items(el, self.marks):
            if isinstance(item, _Run):
                nodes += _text_nodes(item, first, last, preserve)
            else:
                nodes.append(self.node(item, preserve))
        return tuple(nodes)

    def node(self, el: etree._Element, inherited: bool) -> Node | Foreign:
        """The node for `el`, values as written (the checker refuses bad ones where they stand)."""
        tag, line = display(el.tag), el.sourceline
        if tag not in _ELEMENTS:
            return Foreign(tag, line)
        _check_attributes(el, self.where)
        preserve = _preserves(el, inherited)
        if tag == "parameter":
            if _has_content(el):
                raise self.where.error(rules.PARAMETER_NOT_EMPTY, line, tag)
            return Param(el.get("name"), rules.xml_int(el.get("length")), el.get("scaffold"), line)
        if tag == "union":
            return Union(self.members(el, preserve), el.get("scaffold"), line)  # type: ignore[arg-type]
        if tag == "module":
            cache = rules.xml_bool(el.get("cache", "true"))
            return Module(el.get("name"), self.content(el, preserve), cache, line)  # type: ignore[arg-type]
        return RoleBlock(tag, self.children(el, preserve), line)  # type: ignore[arg-type]

    def members(self, el: etree._Element, preserve: bool) -> tuple:
        """A union's members; stray text stays (as written) for the checker to refuse."""
        nodes: list = []
        for item, _, _ in _items(el):
            if not isinstance(item, _Run):
                nodes.append(self.node(item, preserve))
            elif item.text.strip(_WS):
                nodes.append(Text(item.text, item.line))
        return tuple(nodes)

    def content(self, el: etree._Element, preserve: bool) -> tuple[Node, ...]:
        """A module's children: from its `src=` file (then it must be empty) or its content."""
        if el.get("src") is None:
            return self.children(el, preserve)
        if _has_content(el):
            raise self.where.error(rules.src_with_content(el.get("name")), el.sourceline, "module")
        return self.src(el, preserve)

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
        limit = min(SRC_MAX_BYTES, self.budget.left)
        try:
            text = read_text_file(Path(real), limit, what=what, source=self.doc.name, line=line)
        except SchemaError as e:
            if limit == SRC_MAX_BYTES:
                raise
            raise SchemaError(f"{what} would take the schema and its src= files past max_bytes="
                              f"{self.budget.total} ({self.budget.left} bytes were left)", line,
                              source=self.doc.name) from e
        self.budget.left -= len(text.encode("utf-8"))
        # NOTE: a file is one run; no dedent, so code keeps every inner space exactly.
        text = text if preserve else text.strip(_WS)
        return (Text(text, line),) if text else ()


# ---- prompt documents ------------------------------------------------------------------------


def _selection(el: etree._Element, where: Where) -> Selection:
    """A selection with its arguments and nested selections (the checker judges their names)."""
    tag, line = display(el.tag), el.sourceline
    text = next((t for t in [el.text, *(c.tail for c in el)] if t and t.strip(_WS)), None)
    if text is not None:
        raise where.error(rules.selection_with_text(tag, text), line, tag)
    children = tuple(_selection(c, where) for c in el if isinstance(c.tag, str))
    return Selection(tag, tuple((display(k), v) for k, v in attributes(el)), children, line)


def _turn(el: etree._Element, inherited: bool, where: Where, marks: dict | None = None) -> RoleBlock:
    """A chat turn; elements inside it are kept as `Foreign` for the checker to refuse."""
    _check_attributes(el, where)
    elements = tuple(Foreign(display(c.tag), c.sourceline) for c in el if isinstance(c.tag, str))
    return RoleBlock(el.tag, elements or _turn_text(el, inherited, marks), el.sourceline)  # type: ignore[arg-type]


def _turn_text(el: etree._Element, inherited: bool, marks: dict | None = None) -> tuple[Text, ...]:
    """A chat turn's text (the grammar guarantees it holds nothing else)."""
    runs = [item for item, _, _ in _items(el, marks) if isinstance(item, _Run)]
    if not runs:
        return ()
    return tuple(_text_nodes(runs[0], True, True, _preserves(el, inherited)))
