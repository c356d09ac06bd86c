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

Encoding runs in passes (`EncodePass`): pass 0 is the schema with every union's scaffold member;
each other union member gets a pass whose context is the first `prefix_len` tokens of its parent
pass, i.e. everything before the union. Passes with the same parent and prefix are batched.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .chat import ChatFormat
from .nodes import Module, Param, RoleBlock, Schema, Text, Union
from .rules import fit_scaffold

ROOT = ""


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


def encode_text(tokenizer, text: str) -> tuple[int, ...]:
    return tuple(tokenizer.encode(text, add_special_tokens=False)) if text else ()


def leading_bos(tokenizer) -> tuple[int, ...]:
    """(bos,) when the tokenizer's own convention starts sequences with BOS, else ()."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return ()
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return (bos,) if ids and ids[0] == bos else ()


class _Compiler:
    def __init__(self, tokenizer, chat: ChatFormat):
        self.tok, self.chat = tokenizer, chat
        self.modules: dict[str, ModuleLayout] = {}
        self.unions: list[UnionLayout] = []
        filler = getattr(tokenizer, "unk_token_id", None)
        self.filler = filler if filler is not None else (tokenizer.pad_token_id or tokenizer.eos_token_id or 0)

    def block(self, path: str, nodes, start: int, cache: bool, union: int | None = None,
              prefix: tuple[int, ...] = ()) -> int:
        """Lay out one module (or the root) from `start`; returns the position after it."""
        items: list[tuple[str, object]] = []
        pos, pending = start, []
        if prefix:
            items.append(("run", Run(prefix, pos)))
            pos += len(prefix)

        def flush():
            nonlocal pos
            ids = encode_text(self.tok, "".join(pending))
            pending.clear()
            if ids:
                items.append(("run", Run(ids, pos)))
                pos += len(ids)

        def walk(children):
            nonlocal pos
            for node in children:
                if isinstance(node, Text):
                    pending.append(node.text)
                elif isinstance(node, RoleBlock):
                    before, after = self.chat.roles[node.role]
                    pending.append(before)
                    walk(node.children)
                    pending.append(after)
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
            filler = given + (self.filler,) * (node.length - len(given))
            items.append(("slot", Slot(parent, node.name, pos, node.length, filler)))
            return pos + node.length
        if isinstance(node, Module):
            items.append(("module", join(node.name)))
            return self.block(join(node.name), node.children, pos, cache and node.cache)
        assert isinstance(node, Union), node
        index = len(self.unions)
        self.unions.append(None)  # reserve the index; filled below
        ends = []
        for member in node.members:
            items.append(("module", join(member.name)))
            ends.append(self.block(join(member.name), member.children, pos, cache and member.cache, index))
        items.append(("union", index))
        scaffold = join(node.scaffold or node.members[0].name)
        members = tuple(join(m.name) for m in node.members)
        self.unions[index] = UnionLayout(parent, members, scaffold, pos, max(ends) - pos)
        return max(ends)


def compile_schema(schema: Schema, tokenizer, chat: ChatFormat) -> SchemaLayout:
    """Assign every token of `schema` its id and absolute position; plan the encode passes."""
    c = _Compiler(tokenizer, chat)
    length = c.block(ROOT, schema.children, 0, True, prefix=leading_bos(tokenizer))
    passes = _plan_passes(c.modules, c.unions)
    return SchemaLayout(schema.name, length, c.modules, tuple(c.unions), tuple(passes), chat)


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
