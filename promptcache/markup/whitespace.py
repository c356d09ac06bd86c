"""What a PML element's text becomes: the text as written, minus the layout of the XML file.

An author indents an XML file to read it; the model should see the text, not the indentation.
For each element (schema, prompt, module, role block), over its own text (children's text is
their element's business):

1. *Verbatim* characters are never touched: whitespace written as a character reference
   (`&#10;`, `&#32;`, `&#9;`) or inside `<![CDATA[...]]>`. Everything below concerns *literal*
   whitespace: spaces, tabs and newlines typed into the file outside CDATA.
2. Lines are dedented: after every literal newline, the indentation common to all of the
   element's lines that hold text is removed (like `textwrap.dedent`); a line holding no text
   (blank, or only indentation before a child element's tag) loses all its literal whitespace.
3. Literal whitespace at the start and at the end of the element's content is removed: the
   line break after the opening tag and the indentation before the closing tag.
4. Literal whitespace right before or after a role block (`<system>`, `<user>`, `<assistant>`)
   is removed too: the chat format puts its own separators between turns. In a prompt, so is
   whitespace next to the module selections: the free text starts after them.
5. Everything else stays: a newline (or blank line) between two sibling modules, the spaces
   around a parameter, trailing spaces, every character inside a line.

`xml:space="preserve"` switches all of this off for an element and its descendants.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from xml.parsers import expat

from lxml import etree

ROLE, INLINE, LAYOUT = "role", "inline", "layout"  # kinds of child elements, see `normalize_content`
_INDENT = " \t"
_WS = " \t\r\n"


@dataclass(frozen=True)
class TextRun:
    """Text between two child elements of one element; `verbatim`: indices of verbatim characters."""

    text: str
    verbatim: frozenset[int] = frozenset()

    def literal(self, i: int) -> bool:
        """Whether character `i` is literal whitespace (subject to the layout rules)."""
        return self.text[i] in _WS and i not in self.verbatim


def normalize_content(items: Sequence[TextRun | str]) -> list[str]:
    """The text each run of one element becomes.

    Args:
        items: the element's content in order: `TextRun`s, and for each child element its kind:
            ROLE (a role block), INLINE (module, union, parameter: whitespace around it is text)
            or LAYOUT (a prompt's module selection: whitespace around it is layout).

    Returns:
        One string per `TextRun`, in order ("" where nothing remains).
    """
    runs = [(i, item) for i, item in enumerate(items) if isinstance(item, TextRun)]
    margin = _margin([run for _, run in runs])
    out = []
    for i, run in runs:
        before = items[i - 1] if i > 0 else LAYOUT
        after = items[i + 1] if i + 1 < len(items) else LAYOUT
        cuts = _dedent(run, margin) + _edges(run, lead=before != INLINE, trail=after != INLINE)
        out.append(_cut(run.text, cuts))
    return out


def _line_starts(run: TextRun) -> list[int]:
    """Indices where a line starts in `run`: after each literal newline. (A run's first characters
    continue the line of the tag before it.)"""
    starts, j = [], run.text.find("\n")
    while j >= 0:
        if j not in run.verbatim:
            starts.append(j + 1)
        j = run.text.find("\n", j + 1)
    return starts


def _indent(run: TextRun, start: int) -> int:
    """The end of the literal indentation at line start `start`."""
    end = start
    while end < len(run.text) and run.text[end] in _INDENT and end not in run.verbatim:
        end += 1
    return end


def _holds_text(run: TextRun, end: int) -> bool:
    """Whether the line continuing at `end` holds anything before its literal newline."""
    return end < len(run.text) and not (run.text[end] == "\n" and end not in run.verbatim)


def _margin(runs: list[TextRun]) -> str:
    """The indentation common to every line holding text, as a prefix string."""
    prefixes = []
    for run in runs:
        for start in _line_starts(run):
            end = _indent(run, start)
            if _holds_text(run, end):
                prefixes.append(run.text[start:end])
    if not prefixes:
        return ""
    common = prefixes[0]
    for p in prefixes[1:]:
        n = 0
        while n < min(len(common), len(p)) and common[n] == p[n]:
            n += 1
        common = common[:n]
    return common


def _dedent(run: TextRun, margin: str) -> list[tuple[int, int]]:
    """Rule 2: the (start, stop) ranges of indentation to remove."""
    cuts = []
    for start in _line_starts(run):
        end = _indent(run, start)
        stop = min(end, start + len(margin)) if _holds_text(run, end) else end
        if stop > start:
            cuts.append((start, stop))
    return cuts


def _edges(run: TextRun, lead: bool, trail: bool) -> list[tuple[int, int]]:
    """Rules 3 and 4: the literal whitespace at the run's ends where they touch layout."""
    n, j = len(run.text), 0
    while lead and j < n and run.literal(j):
        j += 1
    k = n
    while trail and k > j and run.literal(k - 1):
        k -= 1
    return [(0, j)] * (j > 0) + [(k, n)] * (k < n)


def _cut(text: str, cuts: list[tuple[int, int]]) -> str:
    """`text` without the (possibly overlapping) ranges `cuts`."""
    out, at = [], 0
    for start, stop in sorted(cuts):
        if stop > at:
            out.append(text[at:start])  # empty when the ranges overlap
            at = stop
    out.append(text[at:])
    return "".join(out)


# ---- which characters are verbatim: a second, event-level parse ------------------------------


def verbatim_marks(text: str, root: etree._Element) -> dict[etree._Element, list[frozenset[int]]]:
    """For each element of `root`'s tree, per run slot (before its first child element, then
    after each child element), the indices of verbatim characters in that run.

    lxml resolves CDATA and character references before anyone sees the text, so the document
    is read once more with expat, whose events say where each piece of text came from. Elements
    whose runs do not line up with lxml's text get no marks (everything literal).
    """
    try:
        slots = _expat_slots(text)
    except expat.ExpatError:
        return {}
    elements = [el for el in root.iter() if isinstance(el.tag, str)]
    if len(elements) != len(slots):
        return {}
    marks = {}
    for el, runs in zip(elements, slots):
        texts = _lxml_runs(el)
        if [r for r, _ in runs] == texts:
            marks[el] = [v for _, v in runs]
    return marks


def _lxml_runs(el: etree._Element) -> list[str]:
    runs, pending = [], el.text or ""
    for child in el:
        if isinstance(child.tag, str):
            runs.append(pending)
            pending = ""
        pending += child.tail or ""
    return runs + [pending]


def _expat_slots(text: str) -> list[list[tuple[str, frozenset[int]]]]:
    raw = text.encode("utf-8")
    parser = expat.ParserCreate(encoding="utf-8")
    parser.buffer_text = False
    slots: list[list[list[tuple[str, bool]]]] = []
    stack: list[int] = []
    cdata = [False]

    def start(name, attrs):
        stack.append(len(slots))
        slots.append([[]])

    def end(name):
        stack.pop()
        if stack:
            slots[stack[-1]].append([])

    def data(piece: str):
        if stack:
            verbatim = cdata[0] or raw.startswith(b"&#", parser.CurrentByteIndex)
            slots[stack[-1]][-1].append((piece, verbatim))

    parser.StartElementHandler, parser.EndElementHandler = start, end
    parser.CharacterDataHandler = data
    parser.StartCdataSectionHandler = lambda: cdata.__setitem__(0, True)
    parser.EndCdataSectionHandler = lambda: cdata.__setitem__(0, False)
    parser.Parse(raw, True)
    return [[_joined(pieces) for pieces in runs] for runs in slots]


def _joined(pieces: list[tuple[str, bool]]) -> tuple[str, frozenset[int]]:
    text, verbatim, at = [], set(), 0
    for piece, is_verbatim in pieces:
        if is_verbatim:
            verbatim.update(range(at, at + len(piece)))
        text.append(piece)
        at += len(piece)
    return "".join(text), frozenset(verbatim)
