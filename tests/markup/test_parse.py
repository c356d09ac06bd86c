"""PML parsing: text normalisation, node trees, prompt structure and friendly errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree

from promptcache.errors import PromptCacheError, SchemaError
from promptcache.markup import xmlsafe
from promptcache.markup.nodes import Module, Param, Prompt, RoleBlock, Schema, Selection, Text, Union
from promptcache.markup.parse import is_pml, normalize_text, parse_prompt, parse_schema


def rng_accepts(xml: str) -> bool:
    """The grammar's own verdict, without any Python checks."""
    return xmlsafe.grammar().validate(etree.fromstring(xml.encode()))


def schema_error(xml: str, **kwargs) -> SchemaError:
    with pytest.raises(SchemaError) as info:
        (parse_schema if "<schema" in xml.split(">")[0] else parse_prompt)(xml, **kwargs)
    return info.value


# ---- normalize_text --------------------------------------------------------------------------


@pytest.mark.parametrize("run, first, last, expected", [
    ("   \n\t  ", False, False, "   \n"),  # between inline elements: kept, minus the indentation
    ("\n    Hello\n  ", True, True, "Hello"),
    ("\n    Hello\n  ", False, False, "\nHello\n"),
    (" days.", False, True, " days."),
    ("lasting ", True, False, "lasting "),
    ("  a  b  ", False, False, "  a  b  "),
    ("\n    def f():\n        return 1\n    ", True, True, "def f():\n    return 1"),
    ("\n    x = 1\n\n    y = 2\n", True, False, "x = 1\n\ny = 2\n"),
    ("a\tb", True, True, "a\tb"),
    ("\u00a0nbsp\u00a0", True, True, "\u00a0nbsp\u00a0"),  # not XML whitespace: kept
])
def test_normalize_text(run, first, last, expected):
    assert normalize_text(run, first=first, last=last) == expected


# ---- is_pml ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ('<prompt schema="s"/>', True),
    ('  \n<schema name="s"></schema>', True),
    ('<?xml version="1.0"?>\n<!-- hi -->\n<prompt schema="s">x</prompt>', True),
    ("\ufeff<schema\n name='s'/>", True),
    ("<prompts/>", False),
    ("<schemata/>", False),
    ("Tell me about <prompt> tags", False),
    ("<b>bold</b>", False),
    ("", False),
    ("<!-- unterminated", False),
])
def test_is_pml(text, expected):
    assert is_pml(text) is expected


# ---- schema trees ----------------------------------------------------------------------------

TRAVEL = """<schema name="travel">
  You are a travel planner.
  <system>Be concise.</system>
  <module name="trip">
    Plan a trip lasting <parameter name="duration" length="4"/> days.
    <union scaffold="overseas">
      <module name="domestic">Stay home.</module>
      <module name="overseas">Go abroad.<module name="visa" cache="false">Visa.</module></module>
    </union>
  </module>
  <module name="snippet"><![CDATA[ if a < b and c > d: x = "&" ]]></module>
</schema>"""


def test_schema_tree_matches_python_built_nodes():
    expected = Schema("travel", (
        Text("You are a travel planner."),  # whitespace next to a role block is layout
        RoleBlock("system", (Text("Be concise."),)),
        Module("trip", (
            Text("Plan a trip lasting "),
            Param("duration", 4),
            Text(" days.\n"),
            Union((Module("domestic", (Text("Stay home."),)),
                   Module("overseas", (Text("Go abroad."), Module("visa", (Text("Visa."),), cache=False)))),
                  scaffold="overseas"),
        )),
        Text("\n"),  # between sibling modules: kept
        Module("snippet", (Text(' if a < b and c > d: x = "&" '),)),  # CDATA: verbatim
    ))
    assert parse_schema(TRAVEL) == expected


def test_lines_are_recorded():
    schema = parse_schema(TRAVEL)
    trip = schema.children[2]
    assert trip.line == 4 and trip.children[1].line == 5 and trip.children[3].line == 6


def test_cdata_escapes_and_comments_merge_into_one_text():
    xml = ('<schema name="s"><module name="m">a &lt; b <!-- note --><![CDATA[&& c > d]]><?pi x?> &amp; e'
           "</module></schema>")
    (module,) = parse_schema(xml).children
    assert module.children == (Text("a < b && c > d & e"),)


def test_union_without_scaffold_keeps_none_and_parameter_scaffold_kept():
    xml = """<schema name="s"><union><module name="a">A</module><module name="b">B</module></union>
      <module name="m"><parameter name="p" length="3" scaffold="three"/></module></schema>"""
    union, newline, module = parse_schema(xml).children
    assert newline == Text("\n")
    assert union.scaffold is None and [m.name for m in union.members] == ["a", "b"]
    assert module.children == (Param("p", 3, "three"),)


def test_roles_inside_modules_and_modules_inside_roles():
    xml = """<schema name="s"><user>Intro <module name="a"><parameter name="p" length="2"/></module></user>
      <module name="b"><assistant>Sure <parameter name="q" length="1"/></assistant></module></schema>"""
    user, module = parse_schema(xml).children
    assert user == RoleBlock("user", (Text("Intro "), Module("a", (Param("p", 2),))))
    assert module == Module("b", (RoleBlock("assistant", (Text("Sure "), Param("q", 1))),))


def test_xml_space_preserve_keeps_text_verbatim():
    xml = ('<schema name="s"><module name="m" xml:space="preserve">\n  keep  me\n</module>'
           '<module name="n"> x </module></schema>')
    preserved, normal = parse_schema(xml).children
    assert preserved.children == (Text("\n  keep  me\n"),)
    assert normal.children == (Text("x"),)


def test_empty_module_and_whitespace_only_src_module(tmp_path):
    (tmp_path / "f.txt").write_text("\n  body  \n", encoding="utf-8")
    xml = '<schema name="s"><module name="e"/><module name="f" src="f.txt">  \n </module></schema>'
    empty, from_file = parse_schema(xml, base_dir=tmp_path).children
    assert empty.children == () and from_file.children == (Text("body"),)


def test_src_from_file_path_defaults_base_dir(tmp_path: Path):
    (tmp_path / "code").mkdir()
    code = 'def f(a, b):\n    return a < b and "&"\n\n\n    # trailing indent kept\n'
    (tmp_path / "code" / "f.py").write_text(code, encoding="utf-8")
    path = tmp_path / "s.xml"
    path.write_text('<schema name="s"><module name="f.py" src="code/f.py"/></schema>', encoding="utf-8")
    for source in (path, str(path)):
        schema = parse_schema(source)
        assert schema.source == str(path)
        assert schema.children == (Module("f.py", (Text(code.strip()),)),)


def test_string_schema_has_no_source():
    assert parse_schema('<schema name="s"/>').source is None


def test_prompt_tree():
    prompt = parse_prompt("""<prompt schema="travel">
      <trip duration=" 5 days "><overseas><visa/></overseas></trip>
      <main.py/>
      Give me a plan.
      <user>Also list costs.</user><assistant>Sure.</assistant><user>And food?</user>
    </prompt>""")
    assert prompt == Prompt("travel", (
        Selection("trip", (("duration", " 5 days "),), (Selection("overseas", (), (Selection("visa"),)),)),
        Selection("main.py"),
    ), (
        Text("Give me a plan."),
        RoleBlock("user", (Text("Also list costs."),)),
        RoleBlock("assistant", (Text("Sure."),)),
        RoleBlock("user", (Text("And food?"),)),
    ))


def test_prompt_only_text_and_empty_turn():
    assert parse_prompt('<prompt schema="s"> Hi &amp; bye </prompt>').tail == (Text("Hi & bye"),)
    assert parse_prompt('<prompt schema="s"><user/></prompt>').tail == (RoleBlock("user", ()),)


def test_kind_mismatch():
    assert "expected a <schema>" in str(schema_error_for(parse_schema, '<prompt schema="s"/>'))
    assert "expected a <prompt>" in str(schema_error_for(parse_prompt, '<schema name="s"/>'))


def schema_error_for(fn, xml: str) -> SchemaError:
    with pytest.raises(SchemaError) as info:
        fn(xml)
    return info.value


# ---- structural errors: friendly wording, and the grammar alone rejects them -----------------

STRUCTURE_ERRORS = [
    ('<schema name="t">\n  <modul name="a"/></schema>', 2,
     ["unknown element <modul>", "did you mean <module>", "allowed there: <module>"]),
    ('<schema name="t">\n<module>x</module></schema>', 2, ["<module> needs a name="]),
    ('<schema>\n<module name="a">x</module></schema>', 1, ["<schema> needs a name="]),
    ('<schema name="t">\n<module name="a" cache="yes">x</module></schema>', 2, ["cache=", "'yes'"]),
    ('<schema name="t">\n<module name="a" size="3">x</module></schema>', 2, ["unknown attribute size="]),
    ('<schema name="t"><module name="a">\n<parameter name="p" length="x"/></module></schema>', 2,
     ["length=", "'x'"]),
    ('<schema name="t"><module name="a">\n<parameter name="p" length="0"/></module></schema>', 2,
     ["length="]),
    ('<schema name="t"><module name="a">\n<parameter name="p" length="99999"/></module></schema>', 2,
     ["from 1 to 4096"]),
    ('<schema name="t"><module name="a">\n<parameter name="p"/></module></schema>', 2, ["needs a length="]),
    ('<schema name="t"><module name="a">\n<parameter name="p" length="2">x</parameter></module></schema>', 2,
     ["must be empty"]),
    ('<schema name="t">\n<parameter name="p" length="3"/></schema>', 2, ["only allowed inside a <module>"]),
    ('<schema name="t">\n<user><parameter name="p" length="3"/></user></schema>', 2,
     ["only allowed inside a <module>"]),
    ('<schema name="t">\n<user>\n<module name="a"><system>x</system></module></user></schema>', 3,
     ["<system> cannot be nested inside <user>"]),
    ('<schema name="t">\n<module name="b"><user><assistant>x</assistant></user></module></schema>', 2,
     ["roles do not nest"]),
    ('<schema name="t">\n<module name="a" src="f">text</module></schema>', 2, ["both src= and content"]),
    ('<schema name="t">\n<module name="a" src="f"><module name="b"/></module></schema>', 2, ["both src="]),
    ('<schema name="t">\n<module name="a" src=""/></schema>', 2, ["src= must not be empty"]),
    ('<schema name="t">\n<union>hello<module name="a"/></union></schema>', 2, ["not text 'hello'"]),
    ('<schema name="t">\n<union> <!-- none --> </union></schema>', 2, ["at least one <module>"]),
    ('<schema name="t">\n<union><user/></union></schema>', 2, ["only contain <module> members"]),
    ('<schema name="t">\n<module name="user"/></schema>', 2, ["reserved word"]),
    ('<schema name="t">\n<module name="1a"/></schema>', 2, ["not valid"]),
    ('<schema name="t">\n<module name="a b"/></schema>', 2, ["not valid"]),
    ('<schema name="t">\n<union scaffold="a b"><module name="a"/></union></schema>', 2, ["not valid"]),
    ('<schema name=" ">\n</schema>', 1, ["non-empty name"]),
    ('<schema name="t" xml:space="keep"/>', 1, ["xml:space="]),
    ('<module name="a"/>', 1, ["must be <schema> or <prompt>"]),
    ('<prompt>\n<a/></prompt>', 1, ["<prompt> needs a schema="]),
    ('<prompt schema="t">\n Hi <trip/></prompt>', 2, ["<trip> comes after the text 'Hi'",
                                                     "module selections come first"]),
    ('<prompt schema="t">\n<a/> hi\n<b/></prompt>', 3, ["<b> comes after the text 'hi'"]),
    ('<prompt schema="t">\n<a/><user>x</user>\n<b/></prompt>', 3, ["<b> comes after <user>"]),
    ('<prompt schema="t">\n<trip>x</trip></prompt>', 2, ["contains text 'x'", "go in attributes"]),
    ('<prompt schema="t">\n<user><b/></user></prompt>', 2, ["holds text only"]),
    ('<prompt schema="t">\n<module/></prompt>', 2, ["not a module selection"]),
    ('<prompt schema="t">\n<a><user/></a></prompt>', 2, ["not allowed inside selection <a>"]),
    ('<prompt schema="t">\n<user who="me">x</user></prompt>', 2, ["unknown attribute who="]),
]


@pytest.mark.parametrize("xml, line, phrases", STRUCTURE_ERRORS)
def test_structure_errors_are_friendly(xml, line, phrases):
    error = schema_error(xml)
    assert error.line == line and error.source == "<string>"
    for phrase in phrases:
        assert phrase in error.message


@pytest.mark.parametrize("xml", [x for x, _, _ in STRUCTURE_ERRORS])
def test_grammar_alone_rejects_structure_errors(xml):
    assert not rng_accepts(xml)


def test_friendly_error_has_column():
    error = schema_error('<schema name="t">\n  <modul name="a"/></schema>')
    assert (error.line, error.column) == (2, 3)
    assert str(error).startswith("<string>:2:3: ")


# ---- semantic errors (beyond the grammar) ----------------------------------------------------

SEMANTIC_ERRORS = [
    ('<schema name="t"><module name="a"/>\n<module name="a"/></schema>', 2, "duplicate module name 'a'"),
    ('<schema name="t"><module name="a"/>\n<union><module name="a"/></union></schema>', 2,
     "duplicate module name 'a'"),
    ('<schema name="t"><union><module name="a"/></union>\n<union><module name="a"/></union></schema>', 2,
     "duplicate module name"),
    ('<schema name="t"><user><module name="a"/></user>\n<module name="a"/></schema>', 2, "duplicate module"),
    ('<schema name="t"><module name="m"><module name="a"/>\n<module name="a"/></module></schema>', 2,
     "in module 'm'"),
    ('<schema name="t"><module name="m"><parameter name="p" length="1"/>\n<parameter name="p" length="2"/>'
     "</module></schema>", 2, "duplicate parameter 'p'"),
    ('<schema name="t"><module name="m"><parameter name="p" length="1"/>'
     '<user>\n<parameter name="p" length="2"/></user></module></schema>', 2, "duplicate parameter 'p'"),
    ('<schema name="t">\n<union scaffold="c"><module name="a"/><module name="b"/></union></schema>', 2,
     "scaffold 'c' is not one of its members: a, b"),
    ('<schema name="t">\n<module name="a" src="x.py"/></schema>', 2, "pass base_dir="),
    ('<prompt schema="t">\n<café/></prompt>', 2, "cannot select a module"),
    ('<prompt schema="t">\n<a:b/></prompt>', 2, "malformed XML: Namespace prefix a"),
]


@pytest.mark.parametrize("xml, line, phrase", SEMANTIC_ERRORS)
def test_semantic_errors(xml, line, phrase):
    error = schema_error(xml)
    assert phrase in error.message and error.line == line


def test_same_names_in_different_scopes_are_fine():
    xml = """<schema name="t">
      <module name="a"><module name="x"><parameter name="p" length="1"/></module></module>
      <module name="b"><module name="x"/><parameter name="p" length="1"/></module></schema>"""
    assert [type(n).__name__ for n in parse_schema(xml).children] == ["Module", "Text", "Module"]


def test_errors_are_value_errors():
    with pytest.raises(ValueError):
        parse_schema("<schema")
    assert issubclass(SchemaError, PromptCacheError)
