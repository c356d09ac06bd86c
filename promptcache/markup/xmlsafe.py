"""Safe XML for PML: bounded input in, a validated lxml tree out, every failure a `SchemaError`.

The threat model is a schema or prompt written by someone else. So: sizes are bounded before
any parsing, a DOCTYPE is refused outright (no entity definitions means no entity bombs and no
external entities), lxml never touches the network or a DTD, XInclude is never processed, and
nesting depth is bounded. Messages quote the document's own tags, never the content of files it
points at.

Structure is checked by one definition, the RELAX NG grammar `pml.rng`. libxml2's own verdicts
are terse ("Element schema has extra content: module"), so when the grammar rejects a document,
`first_problem` walks the tree once more to say what is wrong and what is allowed there. It only
words messages: a document the grammar accepts is never refused by it.
"""

from __future__ import annotations

import difflib
import os
import re
import stat
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from lxml import etree

from promptcache.errors import SchemaError

from .nodes import ROLES

MAX_DEPTH = 64
STRING_SOURCE = "<string>"
_RNG_PATH = Path(__file__).with_name("pml.rng")


@dataclass(frozen=True)
class Document:
    """A PML document's text and where it came from (`path` None for a string)."""

    text: str
    name: str
    path: Path | None


def is_xml_text(source: str | os.PathLike) -> bool:
    """True when `source` is XML text rather than a path: a `str` starting with "<"."""
    return isinstance(source, str) and source.lstrip("\ufeff \t\r\n").startswith("<")


def load_document(source: str | os.PathLike, max_bytes: int) -> Document:
    """Return the text of `source` (XML text or a file path), refusing more than `max_bytes`."""
    if is_xml_text(source):
        text = str(source)
        # Characters never outnumber bytes: the cheap test first, then the exact one.
        if len(text) > max_bytes or len(text.encode("utf-8", "surrogatepass")) > max_bytes:
            raise SchemaError(f"document is larger than max_bytes={max_bytes}", source=STRING_SOURCE)
        return Document(text, STRING_SOURCE, None)
    path = Path(source)
    return Document(read_text_file(path, max_bytes, what="PML file"), str(path), path)


def read_text_file(path: Path, max_bytes: int, *, what: str, source: str | None = None,
                   line: int | None = None) -> str:
    """Read a regular UTF-8 file of at most `max_bytes`; errors name the file, never its content.

    Args:
        path: the file to read.
        max_bytes: size bound, checked before reading and again while reading.
        what: how to call the file in messages ("PML file", "src file 'code/a.py'").
        source, line: where the reference to the file sits, for the error's location.
    """
    name = source or str(path)
    try:
        # NOTE: O_NONBLOCK so that opening a FIFO cannot hang; only plain files are then read.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise SchemaError(f"{what} is not a regular file", line, source=name)
            if info.st_size > max_bytes:
                raise SchemaError(f"{what} is {info.st_size} bytes, over the limit of {max_bytes}",
                                  line, source=name)
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise SchemaError(f"cannot read {what}: {e.strerror or type(e).__name__}", line,
                          source=name) from None
    if len(data) > max_bytes:
        raise SchemaError(f"{what} is over the limit of {max_bytes} bytes", line, source=name)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        # The exception's own text quotes the offending bytes; say where instead.
        raise SchemaError(f"{what} is not valid UTF-8 (bad byte at offset {e.start})", line,
                          source=name) from None


def prolog_end(text: str) -> int:
    """Index just past the prolog's whitespace, XML declaration, comments and PIs.

    A hand loop, not a regex: hostile prologs must cost linear time.
    """
    pos, n = 0, len(text)
    while pos < n:
        if text[pos] in "\ufeff \t\r\n":
            pos += 1
        elif text.startswith("<?", pos) or text.startswith("<!--", pos):
            close = "?>" if text[pos + 1] == "?" else "-->"
            end = text.find(close, pos + 2)
            if end < 0:
                return pos
            pos = end + len(close)
        else:
            return pos
    return pos


def parse_xml(doc: Document) -> etree._Element:
    """Parse `doc` with a locked-down lxml parser and return its root element.

    Raises:
        SchemaError: DOCTYPE present, malformed XML (with line and column), or nesting deeper
            than `MAX_DEPTH`.
    """
    start = prolog_end(doc.text)
    if doc.text.startswith("<!DOCTYPE", start):
        line = doc.text.count("\n", 0, start) + 1
        raise SchemaError("DOCTYPE declarations are not allowed in PML (no DTDs, no entities)",
                          line, source=doc.name)
    # A fresh parser per call: lxml parsers keep an error log across parses.
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                             dtd_validation=False, huge_tree=False, encoding="utf-8")
    try:
        root = etree.fromstring(doc.text.encode("utf-8", "replace"), parser)
    except etree.XMLSyntaxError as e:
        raise _syntax_error(e, doc) from None
    if root.getroottree().docinfo.internalDTD is not None:  # belt and braces for the scan above
        raise SchemaError("DOCTYPE declarations are not allowed in PML", source=doc.name)
    _check_depth(root, doc.name)
    return root


def _syntax_error(e: etree.XMLSyntaxError, doc: Document) -> SchemaError:
    # NOTE: e.error_log may hold stale entries from earlier validations; e.msg is this error's.
    line, column = e.position if e.position else (None, None)
    message = re.sub(r", line \d+, column \d+$", "", e.msg or "syntax error")
    return SchemaError(f"malformed XML: {message}", line, column, doc.name)


def _check_depth(root: etree._Element, name: str) -> None:
    stack = [(root, 1)]
    while stack:
        el, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise SchemaError(f"elements nest more than {MAX_DEPTH} levels deep", el.sourceline,
                              source=name)
        stack.extend((child, depth + 1) for child in el if isinstance(child.tag, str))


@lru_cache(maxsize=1)
def grammar() -> etree.RelaxNG:
    """The PML RELAX NG grammar (schemas/pml.rng, shipped as promptcache/markup/pml.rng)."""
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    return etree.RelaxNG(etree.parse(str(_RNG_PATH), parser))


def validate(root: etree._Element, doc: Document) -> None:
    """Validate `root` against the PML grammar; raise a `SchemaError` saying what is wrong.

    The grammar decides; `first_problem` words the message, falling back to the grammar's own
    when it finds nothing more specific.
    """
    rng = grammar()
    if rng.validate(root):
        return
    problem = first_problem(root)
    if problem is not None:
        message, line, tag = problem
        raise SchemaError(message, line, column_of(doc.text, line, tag), doc.name)
    errors = list(rng.error_log)
    first = errors[0] if errors else None
    raise SchemaError(f"document does not match the PML grammar: {first.message if first else '?'}",
                      first.line if first else None, source=doc.name)


def column_of(text: str, line: int | None, tag: str | None) -> int | None:
    """1-based column of `<tag` on `line` of `text` (lxml only records element lines)."""
    if line is None or tag is None:
        return None
    lines = text.split("\n", line)
    if len(lines) < line:
        return None
    found = lines[line - 1].find("<" + tag)
    return found + 1 if found >= 0 else None


# ---- wording the grammar's verdict -----------------------------------------------------------

RESERVED = frozenset({"schema", "prompt", "module", "union", "parameter", *ROLES})
NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
MAX_PARAM_LENGTH = 4096  # the grammar's bound on <parameter length> (pml.rng)
XML_SPACE = "{http://www.w3.org/XML/1998/namespace}space"
_GRAMMAR_MOTTO = "module selections come first, then free text and turns"

Problem = tuple[str, int | None, str | None]  # message, line, tag (to find the column)

_ATTRS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {  # tag -> (required, optional)
    "schema": (("name",), ("xml:space",)),
    "prompt": (("schema",), ("xml:space",)),
    "module": (("name",), ("cache", "src", "xml:space")),
    "union": ((), ("scaffold",)),
    "parameter": (("name", "length"), ("scaffold",)),
    **{role: ((), ("xml:space",)) for role in ROLES},
}


def first_problem(root: etree._Element) -> Problem | None:
    """The first structural problem in document order, worded for people; None if none found."""
    if root.tag == "schema":
        return _schema_problem(root, in_module=False, role=None)
    if root.tag == "prompt":
        return _prompt_problem(root)
    tag = _display(root.tag)
    return f"the document element must be <schema> or <prompt>, not <{tag}>", root.sourceline, tag


def _schema_problem(el: etree._Element, in_module: bool, role: etree._Element | None) -> Problem | None:
    problem = _attr_problem(el) or _content_problem(el)
    if problem:
        return problem
    allowed = ["module"] if el.tag == "union" else [] if el.tag == "parameter" else ["module", "union"]
    if el.tag not in ("union", "parameter"):
        allowed += ["parameter"] if in_module else []
        allowed += list(ROLES) if role is None else []
    for child in _elements(el):
        problem = _placement_problem(child, el, allowed, role)
        if problem:
            return problem
        nested_role = child if child.tag in ROLES else role
        problem = _schema_problem(child, in_module or child.tag == "module", nested_role)
        if problem:
            return problem
    return None


def _placement_problem(child: etree._Element, parent: etree._Element, allowed: list[str],
                       role: etree._Element | None) -> Problem | None:
    tag, line = _display(child.tag), child.sourceline
    if child.tag in allowed:
        return None
    if tag != child.tag:
        return f"<{tag}> is not PML: namespaced elements (XInclude too) are never processed", line, tag
    where = f"inside <{parent.tag}> (line {parent.sourceline})"
    if parent.tag == "union":
        return f"<union> may only contain <module> members, not <{tag}>", line, tag
    if parent.tag == "parameter":
        return "<parameter> must be empty, e.g. <parameter name=\"n\" length=\"8\"/>", line, tag
    if tag in ROLES and role is not None:
        return (f"<{tag}> cannot be nested inside <{role.tag}> (line {role.sourceline}): "
                "roles do not nest", line, tag)
    if tag == "parameter":
        return f"<parameter> is only allowed inside a <module>, not directly {where}", line, tag
    hint = difflib.get_close_matches(tag, allowed, n=1)
    kind = "" if tag in RESERVED else "unknown element "
    mean = f" (did you mean <{hint[0]}>?)" if hint and kind else ""
    listed = ", ".join(f"<{a}>" for a in allowed) or "nothing"
    return f"{kind}<{tag}> is not allowed {where}{mean}; allowed there: {listed}", line, tag


def _content_problem(el: etree._Element) -> Problem | None:
    text = next((t for t in _texts(el) if t.strip()), None)
    line, tag = el.sourceline, el.tag
    if tag == "union" and text is not None:
        return f"<union> may only contain <module> members, not text {_excerpt(text)}", line, tag
    if tag == "union" and not _elements(el):
        return "<union> needs at least one <module> member", line, tag
    if tag == "parameter" and text is not None:
        return "<parameter> must be empty, e.g. <parameter name=\"n\" length=\"8\"/>", line, tag
    if tag == "module" and "src" in el.attrib and (text is not None or len(_elements(el))):
        return (f"module {el.get('name')!r} has both src= and content: its text comes from the "
                "file, so leave the element empty", line, tag)
    return None


def _attr_problem(el: etree._Element) -> Problem | None:
    tag, line = el.tag, el.sourceline
    required, optional = _ATTRS[tag]
    for key in el.attrib:
        name = "xml:space" if key == XML_SPACE else _display(key)
        if name not in required + optional:
            allowed = ", ".join(f"{a}=" for a in required + optional) or "none"
            return f"unknown attribute {name}= on <{tag}>; allowed: {allowed}", line, tag
    for name in required:
        if name not in el.attrib:
            return f"<{tag}> needs a {name}= attribute", line, tag
    for key, value in el.attrib.items():
        message = _value_problem(tag, "xml:space" if key == XML_SPACE else key, value)
        if message:
            return message, line, tag
    return None


def _value_problem(tag: str, attr: str, value: str) -> str | None:
    if attr == "name" and tag in ("module", "parameter") or attr == "scaffold" and tag == "union":
        if value in RESERVED and tag != "parameter":
            return f"{value!r} is a reserved word and cannot name a module (reserved: {sorted(RESERVED)})"
        if not NAME_RE.fullmatch(value):
            return (f"{tag} name {value!r} is not valid: use letters, digits, '_', '.', '-', starting "
                    "with a letter or '_' (prompts use module names as element names)")
    elif attr in ("name", "schema") and (not value.strip() or value != value.strip()):
        return f"{attr}= on <{tag}> must be a non-empty name without surrounding spaces, not {value!r}"
    elif attr == "cache" and value not in ("true", "false"):
        return f"cache= must be \"true\" or \"false\", not {value!r}"
    elif attr == "length" and not _positive_int(value):
        return f"parameter length= must be an integer from 1 to {MAX_PARAM_LENGTH}, not {value!r}"
    elif attr == "src" and not value:
        return "src= must not be empty"
    elif attr == "xml:space" and value not in ("default", "preserve"):
        return f"xml:space= must be \"default\" or \"preserve\", not {value!r}"
    return None


def _prompt_problem(root: etree._Element) -> Problem | None:
    problem = _attr_problem(root)
    tail_start: str | None = None  # what began the free-text tail, for the message
    for item in _mixed(root):
        if problem:
            return problem
        if isinstance(item, str):
            tail_start = tail_start or (f"the text {_excerpt(item)}" if item.strip() else None)
            continue
        tag, line = _display(item.tag), item.sourceline
        if item.tag in ROLES:
            tail_start = tail_start or f"<{tag}> (line {line})"
            problem = _attr_problem(item) or _turn_problem(item)
        elif tag != item.tag or tag in RESERVED:
            problem = f"<{tag}> is not a module selection; {_GRAMMAR_MOTTO}", line, tag
        elif tail_start:
            problem = f"module selection <{tag}> comes after {tail_start}: {_GRAMMAR_MOTTO}", line, tag
        else:
            problem = _selection_problem(item)
    return problem


def _turn_problem(turn: etree._Element) -> Problem | None:
    for child in _elements(turn):
        tag = _display(child.tag)
        return (f"<{turn.tag}> holds text only, not <{tag}> (write code as CDATA or escape "
                "'<' as '&lt;')", child.sourceline, tag)
    return None


def _selection_problem(sel: etree._Element) -> Problem | None:
    tag, line = _display(sel.tag), sel.sourceline
    for key in sel.attrib:
        if key.startswith("{"):
            return f"selection <{tag}>: argument {_display(key)}= must be a plain attribute", line, tag
    text = next((t for t in _texts(sel) if t.strip()), None)
    if text is not None:
        return (f"selection <{tag}> contains text {_excerpt(text)}: a selection holds only nested "
                f"selections; parameter arguments go in attributes, e.g. <{tag} name=\"value\"/>",
                line, tag)
    for child in _elements(sel):
        child_tag = _display(child.tag)
        if child_tag != child.tag or child_tag in RESERVED:
            return (f"<{child_tag}> is not allowed inside selection <{tag}>: only nested module "
                    "selections are", child.sourceline, child_tag)
        problem = _selection_problem(child)
        if problem:
            return problem
    return None


def _elements(el: etree._Element) -> list[etree._Element]:
    return [child for child in el if isinstance(child.tag, str)]


def _texts(el: etree._Element) -> list[str]:
    return [t for t in [el.text, *(child.tail for child in el)] if t]


def _mixed(el: etree._Element) -> list[str | etree._Element]:
    """Text and element children in document order (comments and PIs skipped, their tails kept)."""
    items: list[str | etree._Element] = [el.text] if el.text else []
    for child in el:
        items += [child] if isinstance(child.tag, str) else []
        items += [child.tail] if child.tail else []
    return items


def _display(tag: str) -> str:
    """lxml's `{namespace}local` spelling shown as `prefix:local` (xi:, xml: or ns:)."""
    if tag.startswith("{"):
        ns, local = tag[1:].split("}", 1)
        prefix = "xi" if "XInclude" in ns else "xml" if ns.endswith("XML/1998/namespace") else "ns"
        return f"{prefix}:{local}"
    return tag


def _excerpt(text: str) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= 30 else text[:27] + "...")


def _positive_int(value: str) -> bool:
    try:
        return 1 <= int(value) <= MAX_PARAM_LENGTH
    except ValueError:
        return False
