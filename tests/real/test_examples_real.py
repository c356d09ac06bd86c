"""The shipped examples on the real model: the text the model sees is the text the author wrote,
and a prompt selecting every module (each union's scaffold, each parameter's scaffold as its
argument) is exact: cached output equals `enable_cache=False` token for token."""

from __future__ import annotations

from pathlib import Path
from xml.dom import minidom

import pytest

import promptcache as pc
from promptcache.markup.nodes import Module, Param, RoleBlock, Union
from promptcache.markup.parse import parse_prompt, parse_schema

from .conftest import select_all

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
NAMES = ["codegen", "docqa", "persona", "travel"]
ROLES = ("system", "user", "assistant")
N = 12


def scaffold_texts(nodes, parent: str = "") -> dict[tuple[str, str], str]:
    """(module path, parameter name) -> the parameter's scaffold text ("" without one)."""
    out = {}
    for node in nodes:
        if isinstance(node, Param):
            out[(parent, node.name)] = node.scaffold or ""
        elif isinstance(node, Module):
            out.update(scaffold_texts(node.children, f"{parent}/{node.name}" if parent else node.name))
        elif isinstance(node, RoleBlock):
            out.update(scaffold_texts(node.children, parent))
        elif isinstance(node, Union):
            out.update(scaffold_texts(node.members, parent))
    return out


@pytest.fixture(scope="module")
def examples(smollm2):
    """One engine with every shipped schema added (each encoded once for this file's tests)."""
    engine = pc.Engine(smollm2.model, smollm2.tokenizer, progress=False)
    for name in NAMES:
        engine.add_schema(SCHEMAS / f"{name}.xml")
    return engine


def select_all_prompt(engine, name: str):
    """The shipped prompt's own text and turns after a selection of every module."""
    schema = parse_schema(SCHEMAS / f"{name}.xml")
    layout = engine.schema(name)
    scaffolds = scaffold_texts(schema.children)
    prompt = parse_prompt(SCHEMAS / f"{name}.prompt.xml")
    selections = select_all(layout, lambda slot: scaffolds[(slot.module, slot.name)])
    return type(prompt)(prompt.schema, selections, prompt.tail), layout


# ---- the oracle: the author's text, read straight from the XML files -----------------------------

def _lines(text: str) -> str:
    """Typed text without the file's indentation. The shipped examples indent every line of an
    element equally, which is checked, so removing each line's indentation is the dedent."""
    first, *rest = text.split("\n")
    indents = {len(line) - len(line.lstrip(" \t")) for line in rest if line.strip()}
    assert len(indents) <= 1, f"relative indentation in {text!r}: this oracle does not handle it"
    return "\n".join([first] + [line.lstrip(" \t") for line in rest])


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


class Author:
    """What the author wrote in an element, selecting every module (each union's scaffold) and
    giving each parameter its scaffold text, padded with spaces to the parameter's length."""

    def __init__(self, layout, tokenizer):
        self.layout, self.tokenizer = layout, tokenizer

    def text(self, el, path: str) -> str:
        nodes = [n for n in el.childNodes if n.nodeType != n.COMMENT_NODE]
        parts = [self.node(node, path) for node in nodes]
        # The whitespace typed at an element's edges is layout (a parameter's padding is not).
        if nodes and nodes[0].nodeType == nodes[0].TEXT_NODE:
            parts[0] = parts[0].lstrip(" \t\n")
        if nodes and nodes[-1].nodeType == nodes[-1].TEXT_NODE:
            parts[-1] = parts[-1].rstrip(" \t\n")
        return "".join(parts)

    def node(self, node, path: str) -> str:
        if node.nodeType == node.TEXT_NODE:
            return _lines(node.data)
        if node.nodeType == node.CDATA_SECTION_NODE:
            return node.data
        if node.tagName == "parameter":
            given = node.getAttribute("scaffold")
            used = len(self.tokenizer.encode(given, add_special_tokens=False)) if given else 0
            return given + " " * (self.layout.module(path).slots[node.getAttribute("name")].length - used)
        if node.tagName == "union":
            members = {_join(path, m.getAttribute("name")): m for m in node.childNodes
                       if m.nodeType == m.ELEMENT_NODE}
            scaffold = next(u.scaffold for u in self.layout.unions if set(u.members) == set(members))
            return self.text(members[scaffold], scaffold)
        if node.hasAttribute("src"):
            return (SCHEMAS / node.getAttribute("src")).read_text(encoding="utf-8").strip()
        return self.text(node, _join(path, node.getAttribute("name")) if node.tagName == "module" else path)

    def messages(self, name: str) -> list[dict[str, str]]:
        """Every role block of the schema and then of the prompt, with its text as written."""
        out = []
        for doc in (f"{name}.xml", f"{name}.prompt.xml"):
            for node in minidom.parse(str(SCHEMAS / doc)).documentElement.childNodes:
                if node.nodeType == node.ELEMENT_NODE and node.tagName in ROLES:
                    out.append({"role": node.tagName, "content": self.text(node, "")})
                elif node.nodeType == node.TEXT_NODE:
                    assert not node.data.strip(), f"{doc}: text outside role blocks: {node.data!r}"
        return out


@pytest.mark.parametrize("name", NAMES)
def test_the_model_sees_the_text_the_author_wrote(examples, smollm2, name):
    prompt, layout = select_all_prompt(examples, name)
    plan = examples.plan(prompt)
    expected = smollm2.tokenizer.apply_chat_template(Author(layout, smollm2.tokenizer).messages(name),
                                                     tokenize=False, add_generation_prompt=True)
    assert smollm2.tokenizer.decode(plan.token_ids) == expected


@pytest.mark.parametrize("name", NAMES)
def test_selecting_every_module_is_exact(examples, name):
    prompt, _ = select_all_prompt(examples, name)
    plan = examples.plan(prompt)
    assert plan.tokens.positions == tuple(range(len(plan.token_ids))), "a gap: not exact by construction"
    cached = examples.generate(prompt, max_new_tokens=N)
    full = examples.generate(prompt, max_new_tokens=N, enable_cache=False)
    assert cached.usage.cached_tokens > 0 and full.usage.cached_tokens == 0
    assert cached.token_ids == full.token_ids
    assert cached.text.strip()
