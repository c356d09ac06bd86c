"""The layout compiler: where every token of a schema sits, and what a prompt reuses.

`compile_schema` turns a `Schema` tree into token ids with absolute position ids; `bind` turns a
`Prompt` into the ordered cached modules to splice plus the new tokens to compute. Positions are
assigned once, here, by walking the tree:

    schema "travel"                         positions
    <bos> You are a travel planner.         0 ........ 6     root ("")   always included
    <module trip>  Plan a trip lasting      7 ........ 11    trip
      <parameter duration length=4>         12 . . . . 15    slot: filled by the argument
      days.                                 16 ....... 17    trip
      <union>                               18 ......... 30  union length = longest member (13)
        <module domestic> ...               18 ..... 25      domestic: 8 tokens, 26..30 unused
        <module overseas> ...               18 ......... 30  overseas: 13 tokens
    <module main.py> ...                    31 ....... 90    main.py
    (prompt text after the schema)          91 ...           new tokens

Every module always starts at the same position, whichever other modules a prompt selects, so its
states can be encoded once and reused. A prompt that skips a module leaves a gap in positions
(RoPE and position-aware ALiBi handle gaps; see `models/`).

Encoding runs in passes (`EncodePass`): pass 0 is the schema with every union's scaffold member
(by default its longest, so that selecting every scaffold leaves no gap: such a prompt is exactly
the schema's text at contiguous positions); each other union member gets a pass whose context is
the first `prefix_len` tokens of its parent pass, i.e. everything before the union. Passes with the
same parent and prefix are batched.

A schema with role blocks starts as the chat format starts a conversation (`ChatFormat.preamble`:
the template's start text, and its default system turn unless the first role block is a system
turn); one without role blocks starts like plain text. Role blocks are rendered in order, so a
turn's opener may depend on the turn before it (`ChatFormat.user_after_system`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ..errors import PromptCacheError
from .chat import ChatFormat
from .nodes import Module, Param, RoleBlock, Schema, Text, Union
from .rules import fit_scaffold
from .tokens import Piece, encode_markers, encode_pieces, encode_text

ROOT = ""

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Run:
    """Tokens of one module at consecutive positions start, start+1, ..."""

    token_ids: tuple[int, ...]
    start: int

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)


@dataclass(frozen=True)
class Slot:
    """A parameter's reserved positions, and the filler tokens encoded there."""

    module: str
    name: str
    start: int
    length: int
    filler: tuple[int, ...]


@dataclass(frozen=True)
class UnionLayout:
    parent: str
    members: tuple[str, ...]
    scaffold: str
    start: int
    length: int


@dataclass(frozen=True)
class ModuleLayout:
    """One module: its own runs (not its children's), slots, and items in position order.

    items: ("run", Run) | ("slot", Slot) | ("module", path) | ("union", union index).
    """

    path: str
    start: int
    end: int
    cache: bool
    items: tuple[tuple[str, object], ...]
    union: int | None = None

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    # Derived once (a compiled layout never changes; bind() reads these on every request).
    @functools.cached_property
    def runs(self) -> tuple[Run, ...]:
        return tuple(x for kind, x in self.items if kind == "run")

    @functools.cached_property
    def slots(self) -> Mapping[str, Slot]:
        return MappingProxyType({x.name: x for kind, x in self.items if kind == "slot"})

    @functools.cached_property
    def children(self) -> tuple[str, ...]:
        """Direct child module paths, union members included."""
        return tuple(x for kind, x in self.items if kind == "module")

    @functools.cached_property
    def token_ids(self) -> tuple[int, ...]:
        return tuple(t for r in self.runs for t in r.token_ids)

    @functools.cached_property
    def positions(self) -> tuple[int, ...]:
        return tuple(p for r in self.runs for p in range(r.start, r.end))


@dataclass(frozen=True)
class EncodePass:
    """Tokens encoded together after the first `prefix_len` tokens of pass `parent` (its context).

    owners[i] is the module whose states token i produces, or None for parameter filler.
    """

    parent: int | None
    prefix_len: int
    token_ids: tuple[int, ...]
    positions: tuple[int, ...]
    owners: tuple[str | None, ...]


@dataclass(frozen=True)
class SchemaLayout:
    name: str
    length: int
    modules: dict[str, ModuleLayout]
    unions: tuple[UnionLayout, ...]
    passes: tuple[EncodePass, ...]
    chat: ChatFormat
    ends_after_system: bool = False  # the schema's text ends right after a system turn
    trailing_role: str | None = None  # the schema's text ends right after a turn of this role
    filler: tuple[int, ...] = ()  # the parameter filler's token ids (`compile_schema(param_filler=)`)

    def module(self, path: str) -> ModuleLayout:
        return self.modules[path]


@dataclass(frozen=True)
class PromptPlan:
    """What one prompt needs: cached modules to splice and new tokens to compute.

    `token_ids`/`positions` are every prompt token in position order: the uncached baseline runs
    `token_ids` with contiguous positions. `cached` modules' states are spliced in position order;
    `new_*` tokens (arguments, cache="false" modules, the text after the schema) are computed.
    """

    schema: str
    modules: tuple[str, ...]
    cached: tuple[str, ...]
    new_token_ids: tuple[int, ...]
    new_positions: tuple[int, ...]
    token_ids: tuple[int, ...]
    positions: tuple[int, ...]
    next_position: int
    stop: tuple[str, ...] = field(default=())

    @property
    def cached_token_count(self) -> int:
        return len(self.token_ids) - len(self.new_token_ids)


def leading_bos(tokenizer) -> tuple[int, ...]:
    """(bos,) when the tokenizer's own convention starts sequences with BOS, else ()."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return ()
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return (bos,) if ids and ids[0] == bos else ()


def filler_ids(tokenizer, text: str) -> tuple[int, ...]:
    """The token ids a parameter's unused positions are encoded with: `text`, tokenized. The filler
    is the engine's configuration, not a user's text: a special token's string in it is that token
    (`param_filler=tokenizer.unk_token` fills with the unk id, as the Prompt Cache paper did).

    Raises:
        PromptCacheError: `text` tokenizes to nothing.
    """
    ids = encode_markers(tokenizer, text) if isinstance(text, str) else ()
    if not ids:
        raise PromptCacheError(f"param_filler {text!r} tokenizes to no tokens; give plain text such as ' '")
    return ids


def fill(filler: tuple[int, ...], n: int) -> tuple[int, ...]:
    """`n` filler tokens: `filler` repeated and cut."""
    return (filler * (n // len(filler) + 1))[:n] if n > 0 else ()


def first_role(nodes) -> str | None:
    """The role of the first role block in document order (modules and union members included)."""
    for node in nodes:
        if isinstance(node, RoleBlock):
            return node.role
        found = first_role(node.children) if isinstance(node, Module) else \
            first_role(node.members) if isinstance(node, Union) else None
        if found is not None:
            return found
    return None


@dataclass
class _ChatState:
    """Where the document is, chat-wise: right after a system turn? which turn ended last?"""

    after_system: bool = False
    last_role: str | None = None

    def text(self, text: str) -> None:
        if text.strip():
            self.after_system, self.last_role = False, None


class _Compiler:
    def __init__(self, tokenizer, chat: ChatFormat, filler: tuple[int, ...]):
        self.tok, self.chat, self.filler = tokenizer, chat, filler
        self.modules: dict[str, ModuleLayout] = {}
        self.unions: list[UnionLayout] = []
        self.state = _ChatState()

    def block(self, path: str, nodes, start: int, cache: bool, union: int | None = None,
              prefix: tuple[int, ...] = (), lead: str = "") -> int:
        """Lay out one module (or the root) from `start`; returns the position after it.

        `prefix`: token ids first (the root's BOS); `lead`: text before the nodes (the root's preamble).
        """
        items: list[tuple[str, object]] = []
        pos, pending = start, [Piece(lead, True)]  # markers and text not yet tokenized
        if prefix:
            items.append(("run", Run(prefix, pos)))
            pos += len(prefix)

        def flush():
            nonlocal pos
            ids = encode_pieces(self.tok, pending)
            pending.clear()
            if ids:
                items.append(("run", Run(ids, pos)))
                pos += len(ids)

        def walk(children):
            nonlocal pos
            for node in children:
                if isinstance(node, Text):
                    pending.append(Piece(node.text, False))
                    self.state.text(node.text)
                elif isinstance(node, RoleBlock):
                    pending.append(Piece(self.chat.opener(node.role, self.state.after_system), True))
                    self.state.after_system = False
                    walk(node.children)
                    pending.append(Piece(self.chat.roles[node.role][1], True))
                    self.state = _ChatState(node.role == "system", node.role)
                else:
                    flush()
                    pos = self.child(path, node, pos, cache, items)

        walk(nodes)
        flush()
        self.modules[path] = ModuleLayout(path, start, pos, cache, tuple(items), union)
        return pos

    def child(self, parent: str, node, pos: int, cache: bool, items: list) -> int:
        def join(name: str) -> str:
            return f"{parent}/{name}" if parent else name

        if isinstance(node, Param):
            given = fit_scaffold(node, encode_text(self.tok, node.scaffold or ""), parent)
            rest = node.length - len(given)
            filler = given + fill(self.filler, rest)
            items.append(("slot", Slot(parent, node.name, pos, node.length, filler)))
            self.state.text("x")  # an argument is text: no turn ends right before what follows
            return pos + node.length
        if isinstance(node, Module):
            items.append(("module", join(node.name)))
            return self.block(join(node.name), node.children, pos, cache and node.cache)
        assert isinstance(node, Union), node
        index = len(self.unions)
        self.unions.append(None)  # reserve the index; filled below
        before, laid = self.state, []  # (path, end, chat state after it) per member
        for member in node.members:
            items.append(("module", join(member.name)))
            self.state = _ChatState(before.after_system, before.last_role)
            end = self.block(join(member.name), member.children, pos, cache and member.cache, index)
            laid.append((join(member.name), end, self.state))
        items.append(("union", index))
        length = max(end for _, end, _ in laid) - pos
        # NOTE: the default scaffold is the longest member (the first of equals), so that a prompt
        # selecting it leaves no gap in positions before what follows the union.
        scaffold = join(node.scaffold) if node.scaffold else max(laid, key=lambda m: m[1])[0]
        end, self.state = next((e, st) for path, e, st in laid if path == scaffold)
        if end - pos < length:
            logger.info("union at %s: scaffold %s is %d positions shorter than the union; a prompt "
                        "selecting it has a gap there", parent or "the root", scaffold, length - end + pos)
        self.unions[index] = UnionLayout(parent, tuple(p for p, _, _ in laid), scaffold, pos, length)
        return pos + length


def compile_schema(schema: Schema, tokenizer, chat: ChatFormat, *, param_filler: str = " ") -> SchemaLayout:
    """Assign every token of `schema` its id and absolute position; plan the encode passes.

    A schema with role blocks is a conversation: it starts as the chat format starts one (the
    template's start text, and its default system turn unless the first role block is `<system>`);
    a schema without role blocks starts like plain text, with the tokenizer's BOS if it adds one.

    Args:
        schema: the parsed schema.
        tokenizer: the model's tokenizer.
        chat: the chat format role blocks are rendered in.
        param_filler: text whose tokens fill a parameter's positions beyond its scaffold while the
            schema is encoded (plain text: a special token such as `<unk>` or `<|endoftext|>` there
            would make the text after the parameter look like a new document).
    """
    c = _Compiler(tokenizer, chat, filler_ids(tokenizer, param_filler))
    role = first_role(schema.children)
    bos = leading_bos(tokenizer) if role is None or chat.start is None else ()
    lead = chat.preamble(role) if role is not None else ""
    length = c.block(ROOT, schema.children, 0, True, prefix=bos, lead=lead)
    passes = _plan_passes(c.modules, c.unions)
    return SchemaLayout(schema.name, length, c.modules, tuple(c.unions), tuple(passes), chat,
                        c.state.after_system, c.state.last_role, c.filler)


def _walk(modules, unions, path: str, out: list, forks: list):
    """Append (token, position, owner) of `path` in position order, unions at their scaffold member.

    forks collects (index in out, union) where a union starts, for the other members' passes.
    """
    for kind, x in modules[path].items:
        if kind == "run":
            out.extend((t, x.start + i, path) for i, t in enumerate(x.token_ids))
        elif kind == "slot":
            out.extend((t, x.start + i, None) for i, t in enumerate(x.filler))
        elif kind == "module" and modules[x].union is None:
            _walk(modules, unions, x, out, forks)
        elif kind == "union":
            forks.append((len(out), unions[x]))
            _walk(modules, unions, unions[x].scaffold, out, forks)


def _plan_passes(modules, unions) -> list[EncodePass]:
    passes: list[EncodePass] = []
    todo: list[tuple[int | None, int, str]] = [(None, 0, ROOT)]
    while todo:
        parent, prefix_len, path = todo.pop(0)
        seq: list = []
        forks: list = []
        _walk(modules, unions, path, seq, forks)
        index = len(passes)
        passes.append(EncodePass(parent, prefix_len, tuple(t for t, _, _ in seq),
                                 tuple(p for _, p, _ in seq), tuple(o for _, _, o in seq)))
        for at, union in forks:
            todo.extend((index, prefix_len + at, m) for m in union.members if m != union.scaffold)
    return passes
