"""Typed, frozen trees for PML documents: what the XML (or the Python builder) means.

Nothing here knows about tokens or tensors. `line` fields record where a node came from for
error messages; they are excluded from equality so that a schema built in Python equals the
same schema parsed from XML.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")


@dataclass(frozen=True)
class Text:
    """Literal text. Whitespace is already normalised by the parser (see `normalize_text`)."""

    text: str
    line: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Param:
    """A slot of `length` tokens filled by an argument at prompt time.

    `scaffold` is the text encoded in the slot when the module is precomputed (so the tokens after
    the slot see something plausible); None means filler tokens. The slot's own states are never served.
    """

    name: str
    length: int
    scaffold: str | None = None
    line: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class RoleBlock:
    """`<system>`, `<user>` or `<assistant>`: children rendered inside the model's chat format."""

    role: Role
    children: tuple[Node, ...]
    line: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Module:
    """A reusable prompt module. `cache=False`: its states are computed at every request."""

    name: str
    children: tuple[Node, ...]
    cache: bool = True
    line: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Union:
    """Mutually exclusive modules sharing one start position. `scaffold` names the member that is
    encoded as the context for what follows the union (default: the longest member, the first of
    equals, so that selecting it leaves no position gap)."""

    members: tuple[Module, ...]
    scaffold: str | None = None
    line: int | None = field(default=None, compare=False)


Node = Text | Param | RoleBlock | Module | Union


@dataclass(frozen=True)
class Schema:
    """A `<schema name="...">` document. Text outside any module is always part of a prompt."""

    name: str
    children: tuple[Node, ...]
    source: str | None = field(default=None, compare=False)


# ---- prompt documents ------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """A module selected by a prompt, with parameter arguments and nested selections."""

    name: str
    args: tuple[tuple[str, str], ...] = ()
    children: tuple[Selection, ...] = ()
    line: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Prompt:
    """A `<prompt schema="...">` document: module selections, then free text and chat turns.

    `retrieve`: add the `retrieve` modules of the schema nearest the prompt's question (`retrieve="k"`).
    """

    schema: str
    selections: tuple[Selection, ...]
    tail: tuple[Text | RoleBlock, ...] = ()
    retrieve: int | None = None
