"""PML's vocabulary and value rules, and how every violation is worded.

`check` walks typed trees and asks this module whether each name, length and text is valid; the
XML parser asks it about what only markup can get wrong (attributes, text where no node has room).
Every message a user can get for a PML mistake is written here or in `check`, nowhere else.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import SchemaError
from .nodes import ROLES, Module, Param, RoleBlock, Selection, Text, Union

MAX_DEPTH = 64  # levels, the document element included (xmlsafe bounds XML the same way)
MAX_PARAM_LENGTH = 4096  # the grammar's bound on <parameter length>
NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
RESERVED = frozenset({"schema", "prompt", "module", "union", "parameter", *ROLES})
_INVISIBLE = frozenset({"Cc", "Cf", "Cs", "Co", "Zl", "Zp"})  # controls, format (zero-width, bidi), ...
_SURROGATE = re.compile("[\ud800-\udfff]")
_NAME_RULE = "use letters, digits, '_', '.', '-', starting with a letter or '_'"
MOTTO = "module selections come first, then free text and turns"


@dataclass(frozen=True)
class Foreign:
    """An XML element with no PML meaning. The parser leaves it where it stood so that the
    checker can say where that is and what would be allowed there."""

    tag: str
    line: int | None = None


@dataclass(frozen=True)
class Where:
    """Where a checked tree came from, to place errors: the file name, its XML text and the line
    of its document element (for problems with the document's own name)."""

    source: str | None = None
    text: str | None = None
    line: int | None = None

    def error(self, message: str, line: int | None = None, tag: str | None = None) -> SchemaError:
        return SchemaError(message, line, column_of(self.text, line, tag), self.source)


def column_of(text: str | None, line: int | None, tag: str | None) -> int | None:
    """1-based column of `<tag` on `line` of `text` (lxml only records element lines)."""
    if text is None or line is None or tag is None:
        return None
    lines = text.split("\n", line)
    if len(lines) < line:
        return None
    found = lines[line - 1].find("<" + tag)
    return found + 1 if found >= 0 else None


# ---- values: names, lengths, text -----------------------------------------------------------


def show(value: object) -> str:
    """A short, safe rendering of a value for messages (never the repr of a whole tree)."""
    if isinstance(value, (str, int, float, bool, type(None))):
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."
    return type(value).__name__


def excerpt(text: str) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= 30 else text[:27] + "...")


def invisible(value: str) -> str | None:
    """The first character of `value` that cannot be seen, as "U+200B (ZERO WIDTH SPACE)"."""
    for ch in value:
        if unicodedata.category(ch) in _INVISIBLE:
            return f"U+{ord(ch):04X} ({unicodedata.name(ch, 'a control character')})"
    return None


def name_problem(value: object, what: str, *, reserved: bool = True) -> str | None:
    """Why `value` cannot name a module (`reserved`) or a parameter; None if it can."""
    if not isinstance(value, str):
        return f"{what} name must be a str, got {show(value)}"
    hidden = invisible(value)
    if hidden:
        return f"{what} name {show(value)} contains {hidden}: names must be visible text"
    if reserved and value in RESERVED:
        return f"{value!r} is a reserved word and cannot name a module (reserved: {sorted(RESERVED)})"
    if not NAME_RE.fullmatch(value):
        return f"{what} name {show(value)} is not valid: {_NAME_RULE} (prompts use names as XML names)"
    return None


def document_name_problem(value: object) -> str | None:
    """Why `value` cannot name a schema (`<schema name>`, `<prompt schema>`); None if it can."""
    if not isinstance(value, str):
        return f"schema name must be a str, got {show(value)}"
    hidden = invisible(value)
    if hidden:
        return f"schema name {show(value)} contains {hidden}: names must be visible text"
    if not value.strip() or value != value.strip():
        return f"schema name {show(value)} is not valid: use a non-empty name without surrounding spaces"
    return None


def role_problem(value: object) -> str | None:
    if isinstance(value, str) and value in ROLES:
        return None
    return f"unknown role {show(value)}; expected one of {', '.join(ROLES)}"


def text_problem(value: object, what: str) -> str | None:
    if not isinstance(value, str):
        return f"{what} must be a str, got {type(value).__name__}: {show(value)}"
    bad = _SURROGATE.search(value)
    if bad:
        return (f"{what} holds a lone surrogate U+{ord(bad.group()):04X} at offset {bad.start()}, "
                "which is not a character (decode the source text strictly)")
    return None


def length_problem(param: Param, name: str) -> str | None:
    length = param.length
    if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= MAX_PARAM_LENGTH:
        return (f"parameter {name!r} has length {show(length)}: length= must be an integer from 1 "
                f"to {MAX_PARAM_LENGTH}")
    if param.scaffold is not None:
        return text_problem(param.scaffold, f"the scaffold of parameter {name!r}")
    return None


def fit_scaffold(param: Param, token_ids: tuple[int, ...], module: str) -> tuple[int, ...]:
    """`token_ids` (the parameter's tokenized scaffold) if they fit its slot, else a SchemaError.

    Only the layout compiler knows token counts, so it calls this; nothing is truncated silently.
    """
    if len(token_ids) > param.length:
        raise SchemaError(f"the scaffold of parameter {param.name!r} in module {module!r} is "
                          f"{len(token_ids)} tokens, longer than its length={param.length}: shorten "
                          "the scaffold or raise length=", line_of(param))
    return token_ids


def tag_of(node: object) -> str | None:
    """The XML tag a node is written as (to find its column), if any."""
    if isinstance(node, RoleBlock):
        return node.role if isinstance(node.role, str) else None
    if isinstance(node, Foreign):
        return node.tag
    if isinstance(node, Selection):
        return node.name if isinstance(node.name, str) else None
    for kind, tag in ((Module, "module"), (Union, "union"), (Param, "parameter")):
        if isinstance(node, kind):
            return tag
    return None


def describe(node: object) -> str:
    if isinstance(node, Text):
        return f"text {excerpt(node.text)}" if isinstance(node.text, str) else "a Text"
    if isinstance(node, (Module, Param)):
        return f"<{tag_of(node)}> {show(node.name)}"
    tag = tag_of(node)
    if tag:
        return f"<{tag}>"
    shown = show(node)
    return f"a {shown}" if shown == type(node).__name__ else f"{type(node).__name__} {shown}"


def line_of(node: object) -> int | None:
    line = getattr(node, "line", None)
    return line if isinstance(line, int) and not isinstance(line, bool) else None


def at_line(line: int | None) -> str:
    return f" (line {line})" if line is not None else ""


def first_at(line: int | None) -> str:
    return f" (first at line {line})" if line is not None else ""


# ---- the XML surface: what only markup can get wrong ----------------------------------------

XML_SPACE = "{http://www.w3.org/XML/1998/namespace}space"
_ATTRIBUTES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {  # tag -> (required, optional)
    "schema": (("name",), ("xml:space",)),
    "prompt": (("schema",), ("retrieve", "xml:space")),
    "module": (("name",), ("cache", "src", "xml:space")),
    "union": ((), ("scaffold",)),
    "parameter": (("name", "length"), ("scaffold",)),
    **{role: ((), ("xml:space",)) for role in ROLES},
}
_XSD_INT = re.compile(r"[ \t\r\n]*([+-]?)0*([0-9]{1,12})[ \t\r\n]*")
_HINT_TEXT = "a selection holds only nested selections; parameter arguments go in attributes"
PARAMETER_NOT_EMPTY = "<parameter> must be empty, e.g. <parameter name=\"n\" length=\"8\"/>"


def display(tag: str) -> str:
    """lxml's `{namespace}local` spelling shown as `prefix:local` (xi:, xml: or ns:)."""
    if tag.startswith("{"):
        ns, local = tag[1:].split("}", 1)
        prefix = "xi" if "XInclude" in ns else "xml" if ns.endswith("XML/1998/namespace") else "ns"
        return f"{prefix}:{local}"
    return tag


def attribute_problem(tag: str, attrib: Mapping[str, str]) -> str | None:
    """Unknown or missing attributes of a PML element, or an xml:space= or src= value; None if fine.

    Names, lengths and cache= values are the node checker's business (see `check`).
    """
    required, optional = _ATTRIBUTES[tag]
    for key in attrib:
        if display(key) not in required + optional:
            allowed = ", ".join(f"{a}=" for a in required + optional) or "none"
            return f"unknown attribute {display(key)}= on <{tag}>; allowed: {allowed}"
    for name in required:
        if name not in attrib:
            return f"<{tag}> needs a {name}= attribute"
    space = attrib.get(XML_SPACE)
    if space is not None and space not in ("default", "preserve"):
        return f"xml:space= must be \"default\" or \"preserve\", not {show(space)}"
    if attrib.get("src") == "":
        return "src= must not be empty"
    return None


MAX_RETRIEVE = 64  # modules one prompt may ask retrieval for


def retrieve_problem(value: object) -> str | None:
    """Why `value` cannot be a prompt's retrieve= (a count of modules); None if it can."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RETRIEVE:
        return f"retrieve= must be a whole number of modules from 1 to {MAX_RETRIEVE}, not {show(value)}"
    return None


def xml_int(value: str) -> int | str:
    """An XML Schema integer attribute as an int; anything else (or absurdly long) unchanged."""
    match = _XSD_INT.fullmatch(value)
    return int(match.group(1) + match.group(2)) if match else value


def xml_bool(value: str) -> bool | str:
    """"true"/"false" as a bool; anything else unchanged, for the checker to refuse."""
    return {"true": True, "false": False}.get(value, value)


def src_with_content(name: str | None) -> str:
    return (f"module {name!r} has both src= and content: its text comes from the file, so leave "
            "the element empty")


def selection_with_text(tag: str, text: str) -> str:
    return f"selection <{tag}> contains text {excerpt(text)}: {_HINT_TEXT}, e.g. <{tag} name=\"value\"/>"


def selection_after_tail(tag: str, tail_start: str) -> str:
    return f"module selection <{tag}> comes after {tail_start}: {MOTTO}"


def tail_start(item: str | None, tag: str | None = None, line: int | None = None) -> str:
    """How to name what began a prompt's free-text tail: some text, or a turn."""
    return f"the text {excerpt(item)}" if item is not None else f"<{tag}>{at_line(line)}"


def document_element(tag: str, expected: str) -> str:
    if tag not in ("schema", "prompt"):
        return f"the document element must be <schema> or <prompt>, not <{display(tag)}>"
    return f"expected a <{expected}> document, got <{tag}>"
