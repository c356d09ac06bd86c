"""SchemaBuilder, prompt helpers and the PML writer."""

from __future__ import annotations

import importlib

import pytest

from promptcache.errors import PromptCacheError
from promptcache.markup.builder import SchemaBuilder, make_prompt, prompt_to_xml, schema_to_xml, select
from promptcache.markup.nodes import Module, Param, Prompt, RoleBlock, Schema, Selection, Text, Union

CODE = 'def f(x):\n\tif x < 1 && y > 2:\r\n        return "a & b" ]]> <![CDATA[ z\n'


def parser():
    try:
        return importlib.import_module("promptcache.markup.parse")
    except ImportError:
        pytest.skip("promptcache.markup.parse is not written yet")


def travel() -> Schema:
    b = SchemaBuilder("travel")
    b.text("You are a travel planner.\n")
    with b.role("system"):
        b.text("Be concise.")
    with b.module("trip"):
        b.text("Plan a trip lasting ").parameter("duration", length=4).text(" days.")
        with b.union(scaffold="overseas"):
            with b.module("domestic"):
                b.text("Stay local. Budget: ").parameter("budget", 3, scaffold="$100")
            with b.module("overseas", cache=False):
                b.text("Bring a passport.")
                with b.union():
                    with b.module("europe"):
                        b.text("Trains.")
                    with b.module("asia"):
                        with b.role("user"):
                            b.text("Which visa? ").parameter("country", 2)
    with b.module("code.py"):
        b.text(CODE)
    b.text("  trailing  ")
    return b.build()


EXPECTED = Schema("travel", (
    Text("You are a travel planner.\n"),
    RoleBlock("system", (Text("Be concise."),)),
    Module("trip", (
        Text("Plan a trip lasting "), Param("duration", 4), Text(" days."),
        Union((
            Module("domestic", (Text("Stay local. Budget: "), Param("budget", 3, "$100"))),
            Module("overseas", (
                Text("Bring a passport."),
                Union((
                    Module("europe", (Text("Trains."),)),
                    Module("asia", (RoleBlock("user", (Text("Which visa? "), Param("country", 2))),)),
                )),
            ), cache=False),
        ), scaffold="overseas"),
    )),
    Module("code.py", (Text(CODE),)),
    Text("  trailing  "),
))


def test_builder_equals_hand_written_tree() -> None:
    assert travel() == EXPECTED


def test_adjacent_text_merges_and_empty_text_vanishes() -> None:
    b = SchemaBuilder("s")
    b.text("a").text("").text("b")
    with b.module("m"):
        pass
    b.text(" ")
    assert b.build() == Schema("s", (Text("ab"), Module("m", ()), Text(" ")))


def test_schema_xml_escapes_code() -> None:
    xml = schema_to_xml(travel())
    assert xml.startswith('<schema name="travel" xml:space="preserve">')
    assert "x &lt; 1 &amp;&amp; y &gt; 2:&#13;\n" in xml
    assert "]]&gt; &lt;![CDATA[" in xml
    assert 'scaffold="$100"' in xml and 'cache="false"' in xml


def test_schema_xml_round_trips_through_parser() -> None:
    parse = parser()
    schema = travel()
    assert parse.parse_schema(schema_to_xml(schema)) == schema


def test_attribute_values_survive() -> None:
    parse = parser()
    b = SchemaBuilder("odd \"name\" & <more>")
    with b.module("m"):
        b.parameter("p", 8, scaffold='say "hi"\n\tand <bye> & go')
    schema = b.build()
    assert parse.parse_schema(schema_to_xml(schema)) == schema


def test_parsed_schema_round_trips() -> None:
    parse = parser()
    xml = """
    <schema name="persona">
      Intro text.
      <union>
        <module name="a">  Alpha  <parameter name="x" length="2"/></module>
        <module name="b"><user>Beta</user></module>
      </union>
    </schema>"""
    parsed = parse.parse_schema(xml)
    assert parse.parse_schema(schema_to_xml(parsed)) == parsed


def test_prompt_helpers_and_round_trip() -> None:
    prompt = make_prompt(
        "travel",
        select("trip", select("overseas", select("asia", country="JP")), duration=3),
        select("code.py"),
        text="Question:\n  x < y & z",
        turns=[("user", "Plan it."), {"role": "assistant", "content": "Sure <ok>"}, ("user", "")],
    )
    assert prompt == Prompt("travel", (
        Selection("trip", (("duration", "3"),), (
            Selection("overseas", (), (Selection("asia", (("country", "JP"),)),)),)),
        Selection("code.py"),
    ), (
        Text("Question:\n  x < y & z"),
        RoleBlock("user", (Text("Plan it."),)),
        RoleBlock("assistant", (Text("Sure <ok>"),)),
        RoleBlock("user", ()),
    ))
    xml = prompt_to_xml(prompt)
    assert xml.startswith('<prompt schema="travel" xml:space="preserve"><trip duration="3">')
    assert parser().parse_prompt(xml) == prompt


def _nest_roles(b: SchemaBuilder) -> None:
    with b.role("system"), b.module("m"), b.role("user"):
        pass


def _dup_union_member(b: SchemaBuilder) -> None:
    with b.module("a"):
        pass
    with b.union(), b.module("a"):
        pass


def _dup_param(b: SchemaBuilder) -> None:
    with b.module("m"):
        b.parameter("p", 1)
        with b.role("user"):
            b.parameter("p", 2)


def _unknown_scaffold(b: SchemaBuilder) -> None:
    with b.union(scaffold="z"), b.module("a"):
        pass


def _empty_union(b: SchemaBuilder) -> None:
    with b.union():
        pass


def _text_in_union(b: SchemaBuilder) -> None:
    with b.union():
        b.text("x")


@pytest.mark.parametrize(("action", "message"), [
    (lambda b: b.parameter("p", 4), "only allowed inside a <module>"),
    (lambda b: b.role("system").__enter__().parameter("p", 4), "only allowed inside a <module>"),
    (lambda b: b.module("m").__enter__().parameter("p", 0), "length 0"),
    (lambda b: b.module("m").__enter__().parameter("p", 5000), "from 1 to 4096"),
    (lambda b: b.module("m").__enter__().parameter("p", True), "length True"),
    (lambda b: b.module("m").__enter__().parameter("9p", 2), "parameter name '9p' is not valid"),
    (lambda b: b.module("union").__enter__(), "reserved"),
    (lambda b: b.module("has space").__enter__(), "module name 'has space' is not valid"),
    (lambda b: b.role("tool").__enter__(), "unknown role 'tool'"),
    (lambda b: b.text(3), "text must be a str"),
    (_nest_roles, "roles do not nest"),
    (_dup_union_member, "duplicate module name 'a'"),
    (_dup_param, "duplicate parameter 'p'"),
    (_unknown_scaffold, "scaffold 'z' is not one of its members: a"),
    (_empty_union, "at least one <module>"),
    (_text_in_union, "may only contain <module> members, not text"),
])
def test_eager_validation(action, message: str) -> None:
    with pytest.raises(PromptCacheError, match=message):
        action(SchemaBuilder("s"))


def test_non_module_inside_union() -> None:
    b = SchemaBuilder("s")
    with b.union():
        for bad in (lambda: b.parameter("p", 1), lambda: b.role("user").__enter__(),
                    lambda: b.union().__enter__()):
            with pytest.raises(PromptCacheError, match="may only contain <module> members"):
                bad()
        with b.module("ok"):
            pass


def test_build_inside_open_context_fails() -> None:
    b = SchemaBuilder("s")
    with b.module("m"), b.role("user"):
        with pytest.raises(PromptCacheError, match="still inside module > user"):
            b.build()
    assert b.build() == Schema("s", (Module("m", (RoleBlock("user", ()),)),))


def test_same_names_in_different_scopes_are_fine() -> None:
    b = SchemaBuilder("s")
    for outer in ("a", "b"):
        with b.module(outer), b.module("inner"):
            b.parameter("p", 1)
    assert len(b.build().children) == 2


@pytest.mark.parametrize("name", ["", " padded", "x\n"])
def test_bad_schema_names(name: str) -> None:
    with pytest.raises(PromptCacheError, match="schema name .* (is not valid|contains U\\+000A)"):
        SchemaBuilder(name)


def test_prompt_helper_errors() -> None:
    with pytest.raises(PromptCacheError, match="must be a str"):
        select("m", x=1.5)
    with pytest.raises(PromptCacheError, match="holds Selections"):
        select("m", "child")
    with pytest.raises(PromptCacheError, match="unknown role 'bot'"):
        make_prompt("s", turns=[("bot", "hi")])
    with pytest.raises(PromptCacheError, match="not a module selection"):
        select("user")


def test_xml_refuses_characters_xml_cannot_hold() -> None:
    b = SchemaBuilder("s")
    b.text("bell \x07")
    with pytest.raises(PromptCacheError, match="cannot be written in XML"):
        schema_to_xml(b.build())
