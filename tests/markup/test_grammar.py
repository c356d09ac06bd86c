"""The RELAX NG grammar and the checker agree: random documents, valid or with one mistake, get the
same verdict from both (the checker refusing more only for rules the grammar cannot state)."""

from __future__ import annotations

import random

from lxml import etree

from promptcache.errors import SchemaError
from promptcache.markup import xmlsafe
from promptcache.markup.parse import parse_prompt, parse_schema

XI = ' xmlns:xi="http://www.w3.org/2001/XInclude"'
# Grammar-valid documents the checker still refuses, for rules the grammar cannot state:
BEYOND_GRAMMAR = ("duplicate", "is not one of its members")


class SchemaDocs:
    """Random schema documents (seeded): valid PML, with each choice now and then a mistake."""

    ROLES = ["system", "user", "assistant"]
    TAGS = ["module", "union", "parameter", *ROLES, "modul", "xi:include", "schema"]

    def __init__(self, seed: int):
        self.rng, self.count = random.Random(seed), 0

    def pick(self, good: list, bad: list, p_bad: float = 0.04):
        return self.rng.choice(bad if bad and self.rng.random() < p_bad else good)

    def attr(self, p: float, name: str, good: list, bad: list) -> str:
        return f' {name}="{self.pick(good, bad, 0.25)}"' if self.rng.random() < p else ""

    def name(self) -> str:
        self.count += 1
        return self.pick([f"m{self.count}"], ["user", "1a", "a b", "", "m1"])

    def element(self, depth: int, parent: str, in_role: bool, in_module: bool) -> tuple[str, str | None]:
        good = ["module"] if parent == "union" else ["module", "module", "union"] + (
            ["parameter"] * 2 if in_module else []) + ([] if in_role else self.ROLES)
        tag = self.pick(good, [t for t in self.TAGS if t not in good])
        name = self.name() if tag in ("module", "parameter") and self.rng.random() > 0.02 else None
        attrs = f' name="{name}"' if name is not None else ""
        if tag == "parameter":
            attrs += self.attr(0.97, "length", ["1", "4096", " +05 ", "7"], ["0", "4097", "x", "-3"])
            attrs += self.attr(0.2, "scaffold", ["a &lt; b", ""], [])
        attrs += self.attr(0.2, "cache", ["true", "false"], ["yes", " true "]) if tag == "module" else ""
        attrs += self.attr(0.1 if tag in ("module", *self.ROLES) else 0.01, "xml:space", ["preserve"], ["keep"])
        attrs += ' size="3"' if self.rng.random() < 0.01 else ""
        leaf = tag == "parameter" or (tag == "module" and self.rng.random() < 0.15)
        kids = [] if leaf and self.rng.random() > 0.05 else [
            self.child(depth + 1, tag, in_role or tag in self.ROLES, in_module or tag == "module")
            for _ in range(self.rng.choice([1, 1, 2, 3] if tag == "union" else [0, 1, 2, 3]))]
        if tag == "module" and leaf:
            attrs += f' src="{self.pick(["f.txt"], [""])}"'
        if tag == "union" and self.rng.random() < 0.4:
            members = [n for _, n in kids if n]
            attrs += f' scaffold="{self.pick(members[:1] or ["zz"], ["zz", "a b"])}"'
        body = "".join(k for k, _ in kids)
        return f"<{tag}{attrs}>{body}</{tag}>", name if tag == "module" else None

    def child(self, depth: int, parent: str, in_role: bool, in_module: bool) -> tuple[str, str | None]:
        if depth > 5 or self.rng.random() < 0.25:
            good = [" ", "\n  "] if parent in ("union", "parameter") else ["", " ", "hi", "\n  x\n"]
            return self.pick(good, ["hi"]), None
        return self.element(depth, parent, in_role, in_module)

    def document(self) -> str:
        name = self.pick(["t"], [" t", ""])
        body = "".join(self.child(1, "schema", False, False)[0] for _ in range(self.rng.choice([1, 2, 3])))
        return f'<schema{XI} name="{name}">{body}</schema>'


def prompt_document(rng: random.Random) -> str:
    def selection(depth: int) -> str:
        tag = rng.choice(["a", "b", "c.d", "a", "module", "user", "xi:include"])
        args = "".join(f' {k}="v"' for k in rng.sample(["x", "y", "xml:lang"], rng.choice([0, 0, 1, 2])))
        kids = "".join(selection(depth + 1) for _ in range(rng.choice([0, 0, 1, 2]))) if depth < 3 else ""
        text = rng.choice([""] * 6 + ["oops"])
        return f"<{tag}{args}>{text}{kids}</{tag}>"

    def tail_item() -> str:
        role = rng.choice(["user", "system", "assistant"])
        attr = rng.choice([""] * 6 + [' xml:space="preserve"', ' who="me"', ' xml:space="x"'])
        return rng.choice(["hello ", f"<{role}{attr}>hi</{role}>", f"<{role}>a <b/></{role}>"])

    items = [selection(1) for _ in range(rng.choice([0, 1, 2]))] + [tail_item() for _ in range(rng.choice([0, 1, 2]))]
    if rng.random() < 0.15:
        items.append(selection(1))  # a selection after the tail
    retrieve = rng.choice([""] * 6 + [' retrieve="3"', ' retrieve=" 2 "', ' retrieve="0"', ' retrieve="x"'])
    return f'<prompt{XI} schema="{rng.choice(["t"] * 8 + [""])}"{retrieve}>{"".join(items)}</prompt>'


def verdicts(xml: str, parse, **kwargs) -> tuple[bool, str | None]:
    grammar_ok = xmlsafe.grammar().validate(etree.fromstring(xml.encode()))
    try:
        parse(xml, **kwargs)
        return grammar_ok, None
    except SchemaError as e:
        return grammar_ok, e.message


def test_grammar_and_checker_agree_on_random_schemas(tmp_path):
    (tmp_path / "f.txt").write_text("file text", encoding="utf-8")
    docs, accepted, refused_by_both = SchemaDocs(seed=1234), 0, 0
    for _ in range(800):
        xml = docs.document()
        grammar_ok, problem = verdicts(xml, parse_schema, base_dir=tmp_path)
        if grammar_ok:
            assert problem is None or any(p in problem for p in BEYOND_GRAMMAR), (xml, problem)
        else:
            assert problem is not None, f"the checker accepts what the grammar refuses: {xml}"
        accepted += problem is None
        refused_by_both += not grammar_ok
    assert accepted >= 200 and refused_by_both >= 200  # both sides of the comparison were exercised


def test_grammar_and_checker_agree_on_random_prompts():
    rng, accepted, refused_by_both = random.Random(99), 0, 0
    for _ in range(600):
        xml = prompt_document(rng)
        grammar_ok, problem = verdicts(xml, parse_prompt)
        assert grammar_ok == (problem is None), (xml, problem)
        accepted += grammar_ok
        refused_by_both += not grammar_ok
    assert accepted >= 60 and refused_by_both >= 60


