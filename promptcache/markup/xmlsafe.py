"""Safe XML for PML: bounded input in, an lxml tree out, every failure a `SchemaError`.

The threat model is a schema or prompt written by someone else. So: sizes are bounded before
any parsing, a DOCTYPE is refused outright (no entity definitions means no entity bombs and no
external entities), lxml never touches the network or a DTD, XInclude is never processed, and
nesting depth is bounded. Messages quote the document's own tags, never the content of files it
points at.

What the tree means, and whether it follows the PML rules, is decided afterwards on typed nodes
(`parse`, then `check`). The RELAX NG grammar `pml.rng` is shipped for XML tools (`grammar()`);
PML itself never runs it, and a test keeps it and the checker in agreement.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from lxml import etree

from promptcache.errors import SchemaError

from .rules import MAX_DEPTH

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
        if len(text) > max_bytes or len(_utf8(text)) > max_bytes:
            raise SchemaError(f"document is larger than max_bytes={max_bytes}", source=STRING_SOURCE)
        return Document(text, STRING_SOURCE, None)
    path = Path(source)
    return Document(read_text_file(path, max_bytes, what="PML file"), str(path), path)


def _utf8(text: str) -> bytes:
    """`text` as UTF-8; a lone surrogate (not a character; lxml would make it "?") is refused."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        line = text.count("\n", 0, e.start) + 1
        column = e.start - text.rfind("\n", 0, e.start)
        raise SchemaError(f"the document holds a lone surrogate U+{ord(text[e.start]):04X}, which is "
                          "not a character (decode the source text strictly)", line, column,
                          STRING_SOURCE) from None


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
        root = etree.fromstring(_utf8(doc.text), parser)
    except etree.XMLSyntaxError as e:
        raise _syntax_error(e, doc) from None
    if root.getroottree().docinfo.internalDTD is not None:  # belt and braces for the scan above
        raise SchemaError("DOCTYPE declarations are not allowed in PML", source=doc.name)
    _check_depth(root, doc.name)
    return root


# libxml2's words when a bare "<" or "&" in text was read as markup.
_MARKUP_IN_TEXT = ("StartTag: invalid element name", "error parsing attribute name", "EntityRef",
                   "Specification mandates value", "attributes construct error", "not defined",
                   "Couldn't find end of Start Tag", "Opening and ending tag mismatch")
CDATA_HINT = "if a '<' or '&' there is text, use <![CDATA[...]]> or &lt; / &amp;"


def _syntax_error(e: etree.XMLSyntaxError, doc: Document) -> SchemaError:
    # NOTE: e.error_log may hold stale entries from earlier parses; e.msg is this error's.
    line, column = e.position if e.position else (None, None)
    message = re.sub(r", line \d+, column \d+$", "", e.msg or "syntax error")
    if any(words in message for words in _MARKUP_IN_TEXT):
        message += f" ({CDATA_HINT})"
    return SchemaError(f"malformed XML: {message}", line, column, doc.name)


def _check_depth(root: etree._Element, name: str) -> None:
    stack = [(root, 1)]
    while stack:
        el, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise SchemaError(f"elements nest more than {MAX_DEPTH} levels deep", el.sourceline,
                              source=name)
        stack.extend((child, depth + 1) for child in el if isinstance(child.tag, str))


_ALL_ATTRIBUTES = etree.XPath("@*")
_FEW_ATTRIBUTES = 32  # lookups by name cost at most this many steps each


def attributes(el: etree._Element) -> list[tuple[str, str]]:
    """`el`'s attributes as (name, value) pairs, in document order, in time linear in their number.

    NOTE: lxml's `attrib.items()` looks each value up by name from the first attribute, so k
    attributes cost k^2 steps (40k took 14 s); XPath's `@*` walks the list once, but has a fixed
    cost per call that makes it the slower choice for the usual few attributes.
    """
    if len(el.attrib) <= _FEW_ATTRIBUTES:
        return el.attrib.items()
    return [(str(a.attrname), str(a)) for a in _ALL_ATTRIBUTES(el)]


@lru_cache(maxsize=1)
def grammar() -> etree.RelaxNG:
    """The PML RELAX NG grammar (schemas/pml.rng, shipped as promptcache/markup/pml.rng).

    For XML tools and the tests that keep it in step with `check`; parsing PML does not run it.
    """
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    return etree.RelaxNG(etree.parse(str(_RNG_PATH), parser))
