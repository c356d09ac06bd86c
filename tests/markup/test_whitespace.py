"""PML whitespace: the text as written, minus the XML file's own layout (see markup/whitespace.py)."""

from __future__ import annotations

import pytest

from promptcache.markup.nodes import Module, Param, RoleBlock, Text
from promptcache.markup.parse import parse_prompt, parse_schema


def texts(xml: str) -> list[str]:
    """Every Text node of a schema, in document order."""
    out: list[str] = []

    def walk(nodes):
        for node in nodes:
            if isinstance(node, Text):
                out.append(node.text)
            elif isinstance(node, (Module, RoleBlock)):
                walk(node.children)
    walk(parse_schema(xml).children)
    return out


def module_text(xml: str, name: str = "m") -> str:
    def find(nodes):
        for node in nodes:
            if isinstance(node, Module) and node.name == name:
                return "".join(n.text for n in node.children if isinstance(n, Text))
            if isinstance(node, (Module, RoleBlock)) and (found := find(node.children)) is not None:
                return found
        return None
    return find(parse_schema(xml).children)


@pytest.mark.parametrize("body, expected", [
    ("\n    Hello\n  ", "Hello"),                          # the layout around the text goes
    ("&#10;Hello", "\nHello"),                             # a newline written as a reference stays
    ("&#xA;&#x20; Hello&#10;", "\n  Hello\n"),
    ("<![CDATA[\n  code\n]]>", "\n  code\n"),              # CDATA is verbatim, leading newline included
    ("\n    <![CDATA[  x = 1\n    y = 2]]>\n  ", "  x = 1\n    y = 2"),  # ...but not the layout around it
    ("\n    a\n      b\n    c\n  ", "a\n  b\nc"),          # relative indentation is kept
    ("\n    a\n\n    b\n  ", "a\n\nb"),                    # blank lines are kept, emptied
    ("\n    a  \n    b\n  ", "a  \nb"),                    # trailing spaces are text
    ("\t\ta\n\t\tb", "a\nb"),
    ("\n    &#32;&#32;a\n    b\n  ", "  a\nb"),            # verbatim spaces after the indentation stay
    ("a&#10;    b", "a\n    b"),                        # no line break typed: no indentation to remove
])
def test_a_module_holds_its_text_without_the_files_layout(body: str, expected: str) -> None:
    assert module_text(f'<schema name="s">\n  <module name="m">{body}</module>\n</schema>') == expected


def test_sibling_modules_are_separated_as_written() -> None:
    xml = """<schema name="s">
      <module name="a">A.</module>
      <module name="b">B.</module>

      <module name="c">C.</module> <module name="d">D.</module><module name="e">E.</module>
    </schema>"""
    assert texts(xml) == ["A.", "\n", "B.", "\n\n", "C.", " ", "D.", "E."]


def test_indentation_is_common_to_the_elements_lines_across_inline_children() -> None:
    xml = """<schema name="s">
      <module name="m">
        Plan a trip lasting <parameter name="d" length="2"/> days for
        <parameter name="n" length="2"/> people:
          - by train
        <module name="k">
              Kid text.
              Second kid line.
        </module>
        Done.
      </module>
    </schema>"""
    (m,) = parse_schema(xml).children
    assert m.children == (
        Text("Plan a trip lasting "), Param("d", 2), Text(" days for\n"), Param("n", 2),
        Text(" people:\n  - by train\n"),
        Module("k", (Text("Kid text.\nSecond kid line."),)),  # dedented by its own lines
        Text("\nDone."),
    )


def test_whitespace_next_to_role_blocks_is_layout() -> None:
    xml = """<schema name="s">
      <system>
        Be brief.
      </system>
      Documents:
      <module name="a">A.</module>
      <user>Q?</user>   <assistant>
        A!</assistant>
    </schema>"""
    assert texts(xml) == ["Be brief.", "Documents:\n", "A.", "Q?", "A!"]


def test_a_prompts_text_starts_after_its_selections() -> None:
    prompt = parse_prompt("""<prompt schema="s">
      <a/>
      <b x="1"/>

      Give me &#10;a plan.
      <user>
        Why?
      </user>
    </prompt>""")
    assert prompt.tail == (Text("Give me \na plan."), RoleBlock("user", (Text("Why?"),)))


def test_xml_space_preserve_keeps_everything() -> None:
    xml = '<schema name="s" xml:space="preserve">\n  <module name="m">\n  x\n</module>\n</schema>'
    assert texts(xml) == ["\n  ", "\n  x\n", "\n"]


def test_comments_inside_a_run_do_not_shift_verbatim_characters() -> None:
    xml = '<schema name="s"><module name="m">\n  <!-- note -->&#10;x<!-- b --><![CDATA[ y ]]>\n</module></schema>'
    assert module_text(xml) == "\nx y "
