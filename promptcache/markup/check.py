"""The PML checker: one walk over typed trees for every way a schema or prompt arrives.

XML text and files (`parse`), the Python builder (`builder`) and `Schema`/`Prompt` objects built
by hand all end here, so each rule is checked, and worded (with `rules`), once. The RELAX NG
grammar `pml.rng` states the same structure for XML tools; a test keeps the two in agreement.
Rules the grammar cannot state are only here: unique names per scope, a union's scaffold among
its members, names free of invisible characters.

Work is constant per node (one dict lookup per name), the walk is a loop rather than recursion,
and nesting is bounded by `MAX_DEPTH`, so a hostile tree costs time linear in its size.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NoReturn

from ..errors import SchemaError
from .nodes import ROLES, Module, Param, Prompt, RoleBlock, Schema, Selection, Text, Union
from .rules import (
    MAX_DEPTH,
    MOTTO,
    RESERVED,
    Foreign,
    Where,
    at_line,
    describe,
    document_name_problem,
    first_at,
    length_problem,
    line_of,
    name_problem,
    retrieve_problem,
    role_problem,
    show,
    tag_of,
    text_problem,
)

__all__ = ["check_schema", "check_prompt", "check_selections", "SchemaRules"]

_END = object()


# ---- schemas --------------------------------------------------------------------------------


@dataclass
class _Scope:
    """Names used in one naming scope (the schema root or one module); roles and unions share it."""

    owner: str
    modules: dict[str, int | None] = field(default_factory=dict)
    params: dict[str, int | None] | None = None  # None: no parameters here (the root)


@dataclass
class _Frame:
    """An open container: "schema", "module", "union" or a role."""

    kind: str
    where: str  # for messages: "<module name='a'> (line 3)"
    scope: _Scope
    allowed: tuple[str, ...]  # what may appear directly inside ("text" included)
    role: str | None = None  # the enclosing role, e.g. "<user> (line 2)"
    in_module: bool = False
    line: int | None = None
    members: list[str] | None = None  # a union's member names so far
    scaffold: str | None = None


class SchemaRules:
    """The schema rules, fed one node at a time: `open` a container, `add` a leaf, `close` it.

    `check_schema` feeds it a finished tree; `SchemaBuilder` feeds it call by call. Both therefore
    refuse the same things with the same words, as soon as the offending node arrives.
    """

    def __init__(self, name: object, where: Where | None = None):
        self.where = where or Where()
        problem = document_name_problem(name)
        if problem:
            raise self.where.error(problem, self.where.line, "schema")
        top = ("text", "module", "union", *ROLES)
        self._frames = [_Frame("schema", f"<schema name={name!r}>", _Scope(f"schema {name!r}"), top)]

    def _fail(self, message: str, node: object) -> NoReturn:
        raise self.where.error(message, line_of(node), tag_of(node))

    def _place(self, kind: str, node: object) -> _Frame:
        """The open frame, once `node` (of `kind`) is known to be allowed directly inside it."""
        top = self._frames[-1]
        if kind not in top.allowed:
            self._fail(self._misplaced(kind, node, top), node)
        return top

    @staticmethod
    def _misplaced(kind: str, node: object, top: _Frame) -> str:
        if isinstance(node, Foreign) and ":" in node.tag:
            return f"<{node.tag}> is not PML: namespaced elements (XInclude too) are never processed"
        if top.kind == "union":
            return f"<union> may only contain <module> members, not {describe(node)}"
        if kind in ROLES and top.role is not None:
            return f"<{kind}> cannot be nested inside {top.role}: roles do not nest"
        if kind == "parameter":
            return (f"<parameter> {show(node.name)} is only allowed inside a <module>, "
                    f"not directly inside {top.where}")
        listed = ", ".join(f"<{a}>" for a in top.allowed if a != "text")
        if isinstance(node, Foreign):
            hint = difflib.get_close_matches(node.tag, top.allowed, n=1)
            unknown = node.tag not in RESERVED
            mean = f" (did you mean <{hint[0]}>?)" if hint and unknown else ""
            return (f"{'unknown element ' if unknown else ''}<{node.tag}> is not allowed inside "
                    f"{top.where}{mean}; allowed there: {listed}")
        return f"{top.where} holds text and {listed}, not {describe(node)}"

    def _children(self, value: object, owner: str, node: object) -> tuple:
        if not isinstance(value, tuple):
            self._fail(f"{owner}: children must be a tuple of nodes, got {type(value).__name__}", node)
        return value

    def add(self, node: object) -> None:
        """Check a leaf (`Text`, `Param`) where the innermost open container is."""
        if isinstance(node, Text):
            problem = text_problem(node.text, "text")
            if problem:
                self._fail(problem, node)
            self._place("text", node)
        elif isinstance(node, Param):
            self._param(node)
        else:  # a Foreign element or not a node at all: refused, with the message that fits
            self._fail(self._misplaced("?", node, self._frames[-1]), node)

    def _param(self, param: Param) -> None:
        frame = self._place("parameter", param)
        problem = name_problem(param.name, "parameter", reserved=False)
        problem = problem or length_problem(param, param.name)
        if problem:
            self._fail(problem, param)
        params = frame.scope.params
        assert params is not None, "parameters are only allowed inside a module"
        if param.name in params:
            self._fail(f"duplicate parameter {param.name!r} in {frame.scope.owner}"
                       f"{first_at(params[param.name])}", param)
        params[param.name] = line_of(param)

    def open(self, node: Module | Union | RoleBlock) -> None:
        """Check a container's own fields where it stands, and enter it."""
        if len(self._frames) >= MAX_DEPTH:
            self._fail(f"modules, unions and roles nest more than {MAX_DEPTH} levels deep", node)
        if isinstance(node, Module):
            self._frames.append(self._module(node))
        elif isinstance(node, Union):
            self._frames.append(self._union(node))
        else:
            self._frames.append(self._role(node))

    def _module(self, module: Module) -> _Frame:
        frame = self._place("module", module)
        name = module.name
        problem = name_problem(name, "module")
        if problem:
            self._fail(problem, module)
        if not isinstance(module.cache, bool):
            self._fail(f"module {name!r}: cache= must be true or false, not {show(module.cache)}", module)
        self._children(module.children, f"module {name!r}", module)
        seen = frame.scope.modules
        if name in seen:
            self._fail(f"duplicate module name {name!r} in {frame.scope.owner}"
                       f"{first_at(seen[name])}; sibling modules, "
                       "union members included, need distinct names", module)
        seen[name] = line_of(module)
        if frame.members is not None:
            frame.members.append(name)
        allowed = ("text", "module", "union", "parameter", *(ROLES if frame.role is None else ()))
        return _Frame("module", f"<module name={name!r}>{at_line(line_of(module))}",
                      _Scope(f"module {name!r}", params={}), allowed, frame.role, True)

    def _union(self, union: Union) -> _Frame:
        frame = self._place("union", union)
        if union.scaffold is not None:
            problem = name_problem(union.scaffold, "union scaffold")
            if problem:
                self._fail(problem, union)
        self._children(union.members, "<union>", union)
        return _Frame("union", f"<union>{at_line(line_of(union))}", frame.scope, ("module",), frame.role,
                      frame.in_module, line_of(union), members=[], scaffold=union.scaffold)

    def _role(self, block: RoleBlock) -> _Frame:
        problem = role_problem(block.role)
        if problem:
            self._fail(problem, block)
        frame = self._place(block.role, block)
        self._children(block.children, f"<{block.role}>", block)
        where = f"<{block.role}>{at_line(line_of(block))}"
        allowed = ("text", "module", "union", *(("parameter",) if frame.in_module else ()))
        return _Frame(block.role, where, frame.scope, allowed, where, frame.in_module)

    def close(self) -> None:
        """Leave the innermost container; a union must then have members, its scaffold among them."""
        frame = self._frames.pop()
        if frame.members is None:
            return
        if not frame.members:
            raise self.where.error("<union> needs at least one <module> member", frame.line, "union")
        if frame.scaffold is not None and frame.scaffold not in frame.members:
            raise self.where.error(f"union scaffold {frame.scaffold!r} is not one of its members: "
                                   f"{', '.join(frame.members)}", frame.line, "union")

    def walk(self, children: object) -> None:
        """Check the schema's `children` and everything inside them, depth first, without recursion."""
        stack = [iter(self._children(children, self._frames[0].scope.owner, None))]
        while stack:
            node = next(stack[-1], _END)
            if node is _END:
                stack.pop()
                if stack:
                    self.close()
            elif isinstance(node, (Module, Union, RoleBlock)):
                self.open(node)
                stack.append(iter(node.members if isinstance(node, Union) else node.children))
            else:
                self.add(node)


def check_schema(schema: Schema, *, where: Where | None = None) -> Schema:
    """Check every PML rule on `schema` and return it unchanged.

    Args:
        schema: a `Schema` from `parse_schema`, `SchemaBuilder` or built from the node classes.
        where: the XML it was parsed from, to give errors a source, line and column.

    Raises:
        SchemaError: naming the culprit and what would be valid there.
    """
    if not isinstance(schema, Schema):
        raise SchemaError(f"expected a Schema, got {type(schema).__name__}")
    SchemaRules(schema.name, where).walk(schema.children)
    return schema


# ---- prompts --------------------------------------------------------------------------------


def _selection_problem(sel: object, parent: str | None) -> str | None:
    """What is wrong with one selection's own fields (not its children's)."""
    inside = f"selection <{parent}>" if parent else "a prompt"
    if not isinstance(sel, Selection):
        return f"{inside} holds Selections (use select()), not {describe(sel)}"
    name = sel.name
    if isinstance(name, str) and ":" in name:
        return f"<{name}> is not PML: namespaced elements (XInclude too) are never processed"
    if isinstance(name, str) and name in RESERVED:
        if parent:
            return f"<{name}> is not allowed inside selection <{parent}>: only nested module selections are"
        return f"<{name}> is not a module selection ({name!r} is a reserved word); {MOTTO}"
    problem = name_problem(name, "module", reserved=False)
    if problem:
        return f"cannot select a module: {problem}"
    if not isinstance(sel.args, tuple) or not isinstance(sel.children, tuple):
        return f"selection <{name}>: args and children must be tuples"
    return _args_problem(sel)


def _args_problem(sel: Selection) -> str | None:
    seen: set[str] = set()
    for pair in sel.args:
        if not isinstance(pair, tuple) or len(pair) != 2:
            return f"selection <{sel.name}>: args must be (name, value) pairs, got {show(pair)}"
        key, value = pair
        problem = name_problem(key, "argument", reserved=False)
        problem = problem or text_problem(value, f"argument {key!r}")
        if problem:
            return f"selection <{sel.name}>: {problem}"
        if key in seen:
            return f"selection <{sel.name}>: argument {key!r} is given twice"
        seen.add(key)
    return None


def _turn_problem(node: object) -> str | None:
    if isinstance(node, Text):
        return text_problem(node.text, "prompt text")
    if not isinstance(node, RoleBlock):
        return f"a prompt's tail holds Text and RoleBlock turns, not {describe(node)}"
    problem = role_problem(node.role)
    if problem:
        return problem
    if not isinstance(node.children, tuple):
        return f"<{node.role}>: children must be a tuple of Text, got {type(node.children).__name__}"
    for child in node.children:
        if not isinstance(child, Text):
            return (f"<{node.role}> in a prompt holds text only, not {describe(child)} (write code "
                    "as CDATA or escape '<' as '&lt;')")
        problem = text_problem(child.text, f"<{node.role}> text")
        if problem:
            return problem
    return None


def check_selections(selections: tuple, *, where: Where | None = None) -> None:
    """Check module selections and those nested in them, depth first, without recursion."""
    where = where or Where()
    stack: list[tuple[Iterable, str | None]] = [(iter(selections), None)]
    while stack:
        sel = next(stack[-1][0], _END)
        if sel is _END:
            stack.pop()
            continue
        problem = _selection_problem(sel, stack[-1][1])
        if problem is None and sel.children and len(stack) + 2 > MAX_DEPTH:
            problem = f"selections nest more than {MAX_DEPTH} levels deep"
        if problem:
            raise where.error(problem, line_of(sel), tag_of(sel))
        stack.append((iter(sel.children), sel.name))


def check_prompt(prompt: Prompt, *, where: Where | None = None) -> Prompt:
    """Check `prompt`'s own structure (not whether its schema has the selected modules).

    Raises:
        SchemaError: naming the culprit and what would be valid there.
    """
    where = where or Where()
    if not isinstance(prompt, Prompt):
        raise SchemaError(f"expected a Prompt, got {type(prompt).__name__}")
    problem = document_name_problem(prompt.schema)
    if problem is None and not (isinstance(prompt.selections, tuple) and isinstance(prompt.tail, tuple)):
        problem = "a Prompt's selections and tail must be tuples"
    if problem is None and prompt.retrieve is not None:
        problem = retrieve_problem(prompt.retrieve)
    if problem:
        raise where.error(problem, where.line, "prompt")
    check_selections(prompt.selections, where=where)
    for node in prompt.tail:
        problem = _turn_problem(node)
        if problem:
            children = node.children if isinstance(node, RoleBlock) and isinstance(node.children, tuple) else ()
            child = next((c for c in children if isinstance(c, Foreign)), node)
            raise where.error(problem, line_of(child), tag_of(child))
    return prompt
