"""The example schemas in schemas/: each validates, parses, and its example prompt fits it."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import pytest
from lxml import etree

from promptcache.markup import xmlsafe
from promptcache.markup.check import check_schema
from promptcache.markup.nodes import Module, Param, RoleBlock, Schema, Selection, Text, Union
from promptcache.markup.parse import is_pml, parse_prompt, parse_schema

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
NAMES = ["codegen", "persona", "travel", "docqa"]


def walk(children: Iterable) -> Iterable:
    for node in children:
        yield node
        if isinstance(node, (Module, RoleBlock)):
            yield from walk(node.children)
        elif isinstance(node, Union):
            yield from walk(node.members)


def scope(children: Iterable) -> dict[str, Module]:
    """Modules selectable at this level: roles are transparent, union members count."""
    found: dict[str, Module] = {}
    for node in children:
        if isinstance(node, Module):
            found[node.name] = node
        elif isinstance(node, Union):
            found.update({m.name: m for m in node.members})
        elif isinstance(node, RoleBlock):
            found.update(scope(node.children))
    return found


def params(module: Module) -> set[str]:
    own = [n for n in module.children if isinstance(n, (Param, RoleBlock))]
    return {n.name for n in own if isinstance(n, Param)} | {
        p.name for r in own if isinstance(r, RoleBlock) for p in r.children if isinstance(p, Param)}


def check_selections(selections: tuple[Selection, ...], children: Iterable) -> None:
    available = scope(children)
    for sel in selections:
        assert sel.name in available, f"{sel.name} not in {sorted(available)}"
        module = available[sel.name]
        assert {k for k, _ in sel.args} <= params(module)
        check_selections(sel.children, module.children)


@pytest.mark.parametrize("name", NAMES)
def test_example_schema_and_prompt(name):
    schema = parse_schema(SCHEMAS / f"{name}.xml")
    prompt = parse_prompt(SCHEMAS / f"{name}.prompt.xml")
    assert schema.name == prompt.schema == name
    assert schema.source == str(SCHEMAS / f"{name}.xml")
    assert prompt.selections and prompt.tail
    check_selections(prompt.selections, schema.children)


@pytest.mark.parametrize("path", sorted(SCHEMAS.glob("*.xml")), ids=lambda p: p.name)
def test_every_example_validates_against_the_grammar(path):
    assert xmlsafe.grammar().validate(etree.parse(str(path)))
    assert is_pml(path.read_text(encoding="utf-8"))
    parse = parse_prompt if path.name.endswith(".prompt.xml") else parse_schema
    assert parse(path)


def test_every_schema_has_an_example_prompt():
    schemas = {p.name[:-4] for p in SCHEMAS.glob("*.xml") if not p.name.endswith(".prompt.xml")}
    assert schemas >= set(NAMES)
    assert all((SCHEMAS / f"{name}.prompt.xml").exists() for name in schemas)


def test_codegen_src_text_equals_files_and_is_substantial():
    schema = parse_schema(SCHEMAS / "codegen.xml")
    modules = [n for n in walk(schema.children) if isinstance(n, Module)]
    from_files = 0
    for module in modules:
        path = SCHEMAS / "code" / "inventory" / module.name
        if path.exists():
            assert module.children == (Text(path.read_text(encoding="utf-8").strip()),)
            from_files += 1
    assert from_files >= 4
    code = "".join(n.text for m in modules for n in m.children if isinstance(n, Text))
    assert 8_000 < len(code) < 20_000  # ~2-4k tokens: big enough for a visible speed-up
    assert all(c in code for c in "<>&")
    inline = next(m for m in modules if m.name == "conftest.py").children[0].text
    assert inline.startswith("# tests/conftest.py\nfrom decimal") and '"Glue <extra strong>"' in inline
    assert any(isinstance(n, RoleBlock) and n.role == "system" for n in schema.children)


def test_persona_unions():
    schema = parse_schema(SCHEMAS / "persona.xml")
    unions = [n for n in walk(schema.children) if isinstance(n, Union)]
    assert len(unions) == 5 and all(3 <= len(u.members) <= 4 for u in unions)
    assert all(u.scaffold is None for u in unions)  # the longest member: select-all is gapless


def test_travel_nests_unions_and_parameters():
    schema = parse_schema(SCHEMAS / "travel.xml")
    nodes = list(walk(schema.children))
    unions = [n for n in nodes if isinstance(n, Union)]
    assert len(unions) >= 4
    inner = [u for u in unions if any(isinstance(x, Union) for x in walk(u.members))]
    assert inner, "expected a union nested inside another union"
    assert {"duration", "budget", "citizenship"} <= {n.name for n in nodes if isinstance(n, Param)}
    assert any(isinstance(n, Module) and not n.cache for n in nodes)


def test_docqa_has_many_documents():
    schema = parse_schema(SCHEMAS / "docqa.xml")
    docs = [n for n in walk(schema.children) if isinstance(n, Module) and n.name.startswith("doc-")]
    assert len(docs) >= 8
    assert len(parse_prompt(SCHEMAS / "docqa.prompt.xml").selections) < len(docs)


def test_grammar_ships_inside_the_package():
    shipped = Path(xmlsafe.__file__).with_name("pml.rng")
    assert shipped.resolve() == (SCHEMAS / "pml.rng").resolve()
    pyproject = (SCHEMAS.parent / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'\[tool\.setuptools\.package-data\]\npromptcache = \[[^]]*"markup/pml\.rng"', pyproject)
    assert xmlsafe.grammar() is xmlsafe.grammar()  # built once


@pytest.mark.parametrize("name", NAMES)
def test_example_schemas_pass_the_checker_unchanged(name):
    schema = parse_schema(SCHEMAS / f"{name}.xml")
    assert check_schema(schema) is schema
    assert isinstance(schema, Schema) and schema.children
