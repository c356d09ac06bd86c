"""The one PML checker: objects are checked exactly like markup, with the same words, and its work
grows linearly with the input. (The grammar's agreement with it: test_grammar.py.)"""

from __future__ import annotations

import random
import re
import sys

import pytest
from lxml import etree

from promptcache.errors import SchemaError
from promptcache.markup import xmlsafe
from promptcache.markup.builder import SchemaBuilder, make_prompt, select
from promptcache.markup.chat import BUILTIN_FORMATS
from promptcache.markup.check import check_prompt, check_schema
from promptcache.markup.layout import compile_schema, encode_text
from promptcache.markup.nodes import Module, Param, Prompt, RoleBlock, Schema, Selection, Text, Union
from promptcache.markup.parse import parse_prompt, parse_schema
from promptcache.markup.rules import MAX_DEPTH
from promptcache.testing import tiny_tokenizer


def refused(fn, *args, **kwargs) -> str:
    with pytest.raises(SchemaError) as info:
        fn(*args, **kwargs)
    return info.value.message


def without_lines(message: str) -> str:
    """Objects carry no lines: compare messages with the "(line N)" parts taken out."""
    return re.sub(r" \((first at )?line \d+\)", "", message)


# ---- objects and markup: the same rules, the same words -------------------------------------

M = Module
SAME_AS_XML = [
    (Schema("t", (M("a", ()), M("a", ()))), '<schema name="t"><module name="a"/><module name="a"/></schema>'),
    (Schema("t", (M("a", ()), Union((M("a", ()),)))),
     '<schema name="t"><module name="a"/><union><module name="a"/></union></schema>'),
    (Schema("t", (M("a", (M("b", ()),)), M("a/b", ()))),
     '<schema name="t"><module name="a"><module name="b"/></module><module name="a/b"/></schema>'),
    (Schema("t", (M("user", ()),)), '<schema name="t"><module name="user"/></schema>'),
    (Schema("t", (M("a", (Param("p", -1),)),)),
     '<schema name="t"><module name="a"><parameter name="p" length="-1"/></module></schema>'),
    (Schema("t", (M("a", (Param("p", 0),)),)),
     '<schema name="t"><module name="a"><parameter name="p" length="0"/></module></schema>'),
    (Schema("t", (M("a", (Param("p", 10**9),)),)),
     '<schema name="t"><module name="a"><parameter name="p" length="1000000000"/></module></schema>'),
    (Schema("t", (M("a", (Param("p", 1), RoleBlock("user", (Param("p", 2),)))),)),
     '<schema name="t"><module name="a"><parameter name="p" length="1"/><user><parameter name="p" '
     'length="2"/></user></module></schema>'),
    (Schema("t", (M("a", (), cache="yes"),)), '<schema name="t"><module name="a" cache="yes"/></schema>'),
    (Schema("t", (Param("p", 1),)), '<schema name="t"><parameter name="p" length="1"/></schema>'),
    (Schema("t", (RoleBlock("user", (Param("p", 1),)),)),
     '<schema name="t"><user><parameter name="p" length="1"/></user></schema>'),
    (Schema("t", (RoleBlock("user", (M("a", (RoleBlock("system", ()),)),)),)),
     '<schema name="t"><user><module name="a"><system/></module></user></schema>'),
    (Schema("t", (Union(()),)), '<schema name="t"><union/></schema>'),
    (Schema("t", (Union((Text("hello"), M("a", ()))),)),
     '<schema name="t"><union>hello<module name="a"/></union></schema>'),
    (Schema("t", (Union((RoleBlock("user", ()),)),)), '<schema name="t"><union><user/></union></schema>'),
    (Schema("t", (Union((M("a", ()), M("b", ())), scaffold="c"),)),
     '<schema name="t"><union scaffold="c"><module name="a"/><module name="b"/></union></schema>'),
    (Schema("t", (Union((M("a", ()),), scaffold="a b"),)),
     '<schema name="t"><union scaffold="a b"><module name="a"/></union></schema>'),
    (Schema("t", (M("a\u200bb", ()),)), '<schema name="t"><module name="a&#x200b;b"/></schema>'),
    (Schema("t\u202e", ()), '<schema name="t&#x202e;"/>'),
    (Schema(" t", ()), '<schema name=" t"/>'),
]


@pytest.mark.parametrize("schema, xml", SAME_AS_XML)
def test_objects_are_refused_with_the_words_markup_gets(schema, xml):
    from_xml = refused(parse_schema, xml)
    assert refused(check_schema, schema) == without_lines(from_xml)


@pytest.mark.parametrize("schema, phrase", [
    (Schema("t", (M("a\u200b", ()),)), "U+200B (ZERO WIDTH SPACE)"),
    (Schema("t", (M("a", (Param("p\u202e", 1),)),)), "U+202E (RIGHT-TO-LEFT OVERRIDE)"),
    (Schema("t", (Union((M("a", ()),), scaffold="a\u2066"),)), "U+2066"),
    (Schema("t", ("some text",)), "not str 'some text'"),
    (Schema("t", (M("a", [Text("x")]),)), "children must be a tuple of nodes, got list"),
    (Schema("t", [M("a", ())]), "children must be a tuple of nodes, got list"),
    (Schema("t", (M("a", (Selection("b"),)),)), "not <b>"),
    (Schema("t", (RoleBlock("tool", ()),)), "unknown role 'tool'"),
    (Schema("t", (M("a", (Param("p", True),)),)), "length True"),
    (Schema("t", (M("a", (Param("p", "8"),)),)), "length '8'"),
    (Schema("t", (M("a", (Param("p", 2, scaffold=3),)),)), "scaffold of parameter 'p' must be a str"),
    (Schema("t", (M("a", (Text(b"x"),)),)), "text must be a str, got bytes"),
    (Schema("t", (Text("\ud800"),)), "lone surrogate U+D800"),
    (Schema(None, ()), "schema name must be a str"),
    ("<schema/>", "expected a Schema, got str"),
])
def test_objects_get_named_errors_not_raw_exceptions(schema, phrase):
    assert phrase in refused(check_schema, schema)


def test_duplicate_top_level_module_no_longer_drops_one():
    schema = Schema("t", (M("a", (Text("one"),)), M("a", (Text("two"),))))
    assert "duplicate module name 'a' in schema 't'" in refused(check_schema, schema)


def deep_module(depth: int) -> Schema:
    node = M("leaf", ())
    for i in range(depth):
        node = M(f"m{i}", (node,))
    return Schema("t", (node,))


def test_depth_is_bounded_without_recursion():
    assert check_schema(deep_module(MAX_DEPTH - 2))
    assert f"more than {MAX_DEPTH} levels" in refused(check_schema, deep_module(MAX_DEPTH - 1))
    limit = sys.getrecursionlimit()
    assert f"more than {MAX_DEPTH} levels" in refused(check_schema, deep_module(limit * 3))


def test_valid_objects_come_back_unchanged():
    schema = Schema("t", (Text("Hi "), M("a", (Param("p", 4, "x"), RoleBlock("user", (Text("q"),)))),
                          Union((M("b", ()), M("c", (), cache=False)), scaffold="c")))
    assert check_schema(schema) is schema
    assert parse_schema('<schema name="t">Hi <module name="a"><parameter name="p" length="4" scaffold="x"/>'
                        '<user>q</user></module><union scaffold="c"><module name="b"/>'
                        '<module name="c" cache="false"/></union></schema>') == schema


@pytest.mark.parametrize("written, length", [(" +05 ", 5), ("0000000000000000000004096", 4096), ("1", 1)])
def test_parameter_length_is_read_as_an_xml_schema_integer(written, length):
    xml = f'<schema name="t"><module name="a"><parameter name="p" length="{written}"/></module></schema>'
    assert parse_schema(xml).children[0].children == (Param("p", length),)
    assert xmlsafe.grammar().validate(etree.fromstring(xml.encode()))


def test_absurd_length_is_refused_by_name_not_by_int():
    xml = f'<schema name="t"><module name="a"><parameter name="p" length="{"9" * 5000}"/></module></schema>'
    message = refused(parse_schema, xml)
    assert "length= must be an integer from 1 to 4096" in message and len(message) < 200


def test_builder_uses_the_same_words():
    b = SchemaBuilder("t")
    with b.module("a"):
        pass
    with pytest.raises(SchemaError) as info:
        b.module("a").__enter__()
    xml = '<schema name="t"><module name="a"/><module name="a"/></schema>'
    assert info.value.message == without_lines(refused(parse_schema, xml))


def test_builder_accepts_integer_types_with_index():
    class Four:
        def __index__(self) -> int:
            return 4

    b = SchemaBuilder("t")
    with b.module("a"):
        b.parameter("p", Four())
    assert b.build().children[0].children == (Param("p", 4),)


def test_a_scaffold_longer_than_its_parameter_is_refused_not_truncated():
    tok = tiny_tokenizer()
    scaffold = "seven or eight days"
    n = len(encode_text(tok, scaffold))
    xml = ('<schema name="t"><module name="trip">\n<parameter name="days" length="{}" scaffold="{}"/>'
           "</module></schema>")
    fits = compile_schema(parse_schema(xml.format(n, scaffold)), tok, BUILTIN_FORMATS["plain"])
    assert fits.modules["trip"].slots["days"].filler == encode_text(tok, scaffold)
    with pytest.raises(SchemaError) as info:
        compile_schema(parse_schema(xml.format(n - 1, scaffold)), tok, BUILTIN_FORMATS["plain"])
    assert f"parameter 'days' in module 'trip' is {n} tokens, longer than its length={n - 1}" in str(info.value)
    assert info.value.line == 2


def random_node(rng: random.Random, depth: int):
    """A random node, sometimes with a wrong field or of a wrong type."""
    def pick(good, bad):
        return rng.choice(bad) if rng.random() < 0.05 else rng.choice(good)

    def kids():
        nodes = tuple(random_node(rng, depth + 1) for _ in range(rng.choice([0, 1, 2]) if depth < 4 else 0))
        return pick([nodes], [list(nodes)])

    kind = pick(["text", "param" if depth else "text", "module", "module", "union", "role"], ["junk", "selection"])
    name = pick([f"n{rng.getrandbits(32)}"], ["", "a/b", None, 7, "user", "x\u200b", "n0"])
    if kind == "text":
        return Text(pick(["hi ", "\n"], [None, b"x", "\ud800"]))
    if kind == "param":
        return Param(name, pick([1, 3, 8], [0, -1, True, "4", 10**6, 2.0]), pick([None, "a b c d e f"], [5]))
    if kind == "module":
        return Module(name, kids(), pick([True, False], ["no", None]))
    if kind == "union":
        members = kids()
        return Union(members, pick([None, getattr(next(iter(members), None), "name", None)], ["zz", 3]))
    if kind == "role":
        return RoleBlock(pick(["user", "system", "assistant"], ["tool", None]), kids())
    return Selection("a") if kind == "selection" else rng.choice([None, 3, "text", (Text("x"),)])


def test_random_objects_are_refused_by_name_or_compile_cleanly():
    rng, tok, compiled = random.Random(7), tiny_tokenizer(), 0
    for _ in range(400):
        schema = Schema(rng.choice(["t"] * 9 + [""]), tuple(random_node(rng, 0) for _ in range(3)))
        try:
            check_schema(schema)
            compile_schema(schema, tok, BUILTIN_FORMATS["plain"])  # no IndexError, KeyError, ...
            compiled += 1
        except SchemaError:
            pass
    assert compiled >= 40


# ---- prompts --------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt, phrase", [
    (Prompt("t", (Selection("a", (("x", 1),)),)), "argument 'x' must be a str, got int"),
    (Prompt("t", (Selection("a", (("x",),)),)), "(name, value) pairs"),
    (Prompt("t", (Selection("a", (("x", "1"), ("x", "2"))),)), "argument 'x' is given twice"),
    (Prompt("t", (Selection("a", (("9x", "1"),)),)), "argument name '9x' is not valid"),
    (Prompt("t", (Selection("a", (("x", "\udc00"),)),)), "lone surrogate U+DC00"),
    (Prompt("t", (Selection("a/b"),)), "cannot select a module"),
    (Prompt("t", (Selection("a\u200d"),)), "U+200D"),
    (Prompt("t", (Selection("user"),)), "not a module selection"),
    (Prompt("t", (Selection("a", (), (Selection("module"),)),)), "not allowed inside selection <a>"),
    (Prompt("t", ("a",)), "a prompt holds Selections"),
    (Prompt("t", (), (M("a", ()),)), "holds Text and RoleBlock turns"),
    (Prompt("t", (), (RoleBlock("user", (Param("p", 1),)),)), "holds text only"),
    (Prompt("t", (), (RoleBlock("bot", ()),)), "unknown role 'bot'"),
    (Prompt("", ()), "schema name '' is not valid"),
    (Prompt("t", [Selection("a")]), "must be tuples"),
    (Prompt("t", (), (Text(3),)), "prompt text must be a str, got int"),
    (Prompt("t", (), (RoleBlock("user", (Text("\ud800"),)),)), "lone surrogate U+D800"),
])
def test_prompt_objects_get_named_errors(prompt, phrase):
    assert phrase in refused(check_prompt, prompt)


def test_prompt_selection_depth_is_bounded_without_recursion():
    sel = Selection("leaf")
    for i in range(sys.getrecursionlimit() * 3):
        sel = Selection(f"s{i}", (), (sel,))
    assert "nest more than" in refused(check_prompt, Prompt("t", (sel,)))


def test_prompt_objects_and_markup_share_words():
    xml = '<prompt schema="t"><a><user/></a></prompt>'
    obj = Prompt("t", (Selection("a", (), (Selection("user"),)),))
    assert refused(check_prompt, obj) == without_lines(refused(parse_prompt, xml))
    assert check_prompt(make_prompt("t", select("a", x=3), text="hi")) == parse_prompt(
        '<prompt schema="t" xml:space="preserve"><a x="3"/>hi</prompt>')


# ---- work grows linearly with the input ------------------------------------------------------

def interpreter_steps(fn) -> int:
    """Python bytecodes executed plus C functions called while `fn()` runs (a work count, not a time)."""
    count = 0

    def trace(frame, event, arg):
        nonlocal count
        frame.f_trace_opcodes = True
        count += 1
        return trace

    def profile(frame, event, arg):
        nonlocal count
        count += event == "c_call"

    sys.settrace(trace)
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.settrace(None)
        sys.setprofile(None)
    return count


def sibling_schema(n: int) -> str:
    body = "".join(f'<module name="m{i}">Doc {i} <parameter name="p" length="2"/><user>hi</user></module>'
                   f'<union><module name="u{i}"/><module name="v{i}">x</module></union>\n' for i in range(n))
    members = "".join(f'<module name="w{i}"/>' for i in range(n))
    return f'<schema name="t">{body}<union scaffold="w0">{members}</union></schema>'


def sibling_prompt(n: int) -> str:
    sels = "".join(f'<m{i} p="v"><u{i}/></m{i}>' for i in range(n))
    return f'<prompt schema="t">{sels}{"<user>hi</user> and " * n}</prompt>'


def assert_linear(work) -> None:
    small, double, quadruple = (work(n) for n in (60, 120, 240))
    # Differences cancel fixed costs: linear work doubles them, quadratic work quadruples them.
    assert quadruple - double <= 2.3 * (double - small), (small, double, quadruple)


@pytest.mark.parametrize("work", [
    lambda n: interpreter_steps(lambda: parse_schema(sibling_schema(n))),
    lambda n: interpreter_steps(lambda: parse_prompt(sibling_prompt(n))),
    lambda n: interpreter_steps(lambda: check_schema(Schema("t", tuple(M(f"m{i}", (Text("x"),)) for i in range(n))))),
], ids=["parse_schema", "parse_prompt", "check_schema"])
def test_work_is_linear_in_the_number_of_siblings(work):
    assert_linear(work)


def test_parsing_never_runs_the_quadratic_grammar_validator(monkeypatch):
    monkeypatch.setattr(xmlsafe, "grammar", lambda: pytest.fail("the RELAX NG validator ran"))
    assert parse_schema(sibling_schema(3)) and parse_prompt(sibling_prompt(3))
