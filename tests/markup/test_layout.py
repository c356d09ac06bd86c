"""Layout compiler: every token's absolute position, and the encode passes that produce them."""

from __future__ import annotations

import functools

import pytest

from promptcache.errors import PromptCacheError
from promptcache.markup.builder import SchemaBuilder
from promptcache.markup.chat import BUILTIN_FORMATS, ChatFormat
from promptcache.markup.layout import ROOT, SchemaLayout, compile_schema
from promptcache.markup.parse import parse_schema
from promptcache.markup.tokens import encode_markers
from promptcache.testing import tiny_tokenizer

PLAIN = BUILTIN_FORMATS["plain"]

FLAT = """
<schema name="flat">
  You answer questions.
  <module name="a">The first document talks about the city.</module>
  <module name="b">Water.</module>
  Answer now.
</schema>
"""

UNION = """
<schema name="u">
  You plan trips.
  <module name="intro">Plan the trip.</module>
  <union scaffold="short">
    <module name="short">Go by air.</module>
    <module name="long">Go by water, then by air, then walk the long way home.</module>
    <module name="mid">Go by water and air.</module>
  </union>
  <module name="after">Say which.</module>
</schema>
"""

TRIP = """
<schema name="trip">
  <module name="trip">Plan a trip lasting <parameter name="days" length="5"/> days.</module>
  <module name="hint">Plan for <parameter name="city" length="4" scaffold="the city"/> now.</module>
</schema>
"""

NESTED = """
<schema name="n">
  Hello.
  <union scaffold="s">
    <module name="s">Scaffold <module name="inner">inner text</module> end of s.</module>
    <module name="m">
      Member one.
      <union scaffold="v1">
        <module name="v1">Go by air.</module>
        <module name="v2">Go by water and the long way home.</module>
      </union>
      Member tail.
      <module name="kid">The kid module.</module>
    </module>
  </union>
  <module name="after">After all.</module>
</schema>
"""

LIVE = """
<schema name="live">
  <module name="live" cache="false">Now: <module name="kid">the time</module>.</module>
  <module name="kept">Kept.</module>
</schema>
"""


@functools.cache
def tok():
    return tiny_tokenizer()


def compile_(xml: str, chat=PLAIN) -> SchemaLayout:
    return compile_schema(parse_schema(xml), tok(), chat)


def n_tokens(text: str) -> int:
    return len(encode_markers(tok(), text))


def all_positions(layout: SchemaLayout) -> list[int]:
    return [p for m in layout.modules.values() for p in m.positions]


def test_root_starts_with_bos_at_zero():
    layout = compile_(FLAT)
    root = layout.module(ROOT)
    assert root.start == 0 and root.positions[0] == 0
    assert root.token_ids[0] == tok().bos_token_id
    assert root.runs[0].token_ids == (tok().bos_token_id,)
    assert root.runs[1].token_ids == encode_markers(tok(), "You answer questions.\n")
    assert root.runs[1].start == 1


def test_modules_and_the_text_between_them_are_consecutive():
    layout = compile_(FLAT)
    root, a, b = layout.module(ROOT), layout.module("a"), layout.module("b")
    assert a.start == root.runs[1].end
    assert a.token_ids == encode_markers(tok(), "The first document talks about the city.")
    assert a.positions == tuple(range(a.start, a.end))
    # The line break written between the two modules is root text, like any other.
    assert root.runs[2].start == a.end and root.runs[2].token_ids == encode_markers(tok(), "\n")
    assert b.start == root.runs[2].end and b.end == b.start + n_tokens("Water.")
    assert root.runs[3].start == b.end and root.runs[3].token_ids == encode_markers(tok(), "\nAnswer now.")
    assert layout.length == root.runs[3].end == root.end
    assert sorted(all_positions(layout)) == list(range(layout.length)), "no gaps, no overlaps"
    assert root.children == ("a", "b")


def test_union_members_share_a_start_and_the_longest_sets_the_length():
    layout = compile_(UNION)
    (union,) = layout.unions
    short, long, mid, after = (layout.module(p) for p in ("short", "long", "mid", "after"))
    assert union.members == ("short", "long", "mid") and union.scaffold == "short"
    assert union.parent == ROOT
    assert short.start == long.start == mid.start == union.start == layout.module("intro").end + n_tokens("\n")
    lengths = [n_tokens(t) for t in ("Go by air.", "Go by water, then by air, then walk the long way home.",
                                     "Go by water and air.")]
    assert [len(m.token_ids) for m in (short, long, mid)] == lengths
    assert max(lengths) != lengths[0], "the longest member is not the first"
    assert union.length == max(lengths)
    assert after.start == union.start + max(lengths) + n_tokens("\n")
    assert {m.union for m in (short, long, mid)} == {0} and after.union is None


def test_parameters_reserve_exactly_their_length():
    layout = compile_(TRIP)
    trip, hint = layout.module("trip"), layout.module("hint")
    slot = trip.slots["days"]
    assert (slot.module, slot.name, slot.length) == ("trip", "days", 5)
    first, second = trip.runs
    assert slot.start == first.end and second.start == slot.start + 5
    assert trip.end == second.end and hint.start == trip.end + n_tokens("\n")
    assert len(slot.filler) == 5
    # A scaffold text fills the start of its slot; the module's own tokens skip the slot.
    city = hint.slots["city"]
    given = encode_markers(tok(), "the city")
    assert city.filler[: len(given)] == given and len(city.filler) == 4
    assert set(hint.positions).isdisjoint(range(city.start, city.start + 4))
    assert hint.end - hint.start == len(hint.token_ids) + 4


def test_nested_modules_inside_union_members():
    layout = compile_(NESTED)
    s, inner, m = layout.module("s"), layout.module("s/inner"), layout.module("m")
    assert s.children == ("s/inner",) and inner.union is None and s.union == 0
    assert inner.start == s.runs[0].end and s.runs[1].start == inner.end
    assert inner.token_ids == encode_markers(tok(), "inner text")
    assert m.start == s.start
    nested = layout.unions[1]
    assert nested.parent == "m" and nested.members == ("m/v1", "m/v2") and nested.scaffold == "m/v1"
    assert nested.start == m.runs[0].end
    assert m.runs[1].start == nested.start + nested.length
    assert layout.module("m/kid").start == m.runs[1].end
    (outer,) = [u for u in layout.unions if u.parent == ROOT]
    assert outer.length == max(s.end, m.end) - outer.start
    assert layout.module("after").start == outer.start + outer.length + n_tokens("\n")


def test_cache_false_is_inherited():
    layout = compile_(LIVE)
    assert not layout.module("live").cache and not layout.module("live/kid").cache
    assert layout.module("kept").cache and layout.module(ROOT).cache


def _pass_tokens(layout: SchemaLayout, owners: set[str | None]):
    p = layout.passes[0]
    return [(t, q) for t, q, o in zip(p.token_ids, p.positions, p.owners, strict=True) if o in owners]


def test_pass_zero_covers_the_scaffold_members_and_others_follow_the_prefix():
    layout = compile_(UNION)
    p0 = layout.passes[0]
    assert p0.parent is None and p0.prefix_len == 0
    assert set(p0.owners) == {ROOT, "intro", "short", "after"}
    assert list(p0.positions) == sorted(p0.positions)
    for path in (ROOT, "intro", "short", "after"):
        mod = layout.module(path)
        assert _pass_tokens(layout, {path}) == list(zip(mod.token_ids, mod.positions, strict=True))
    union = layout.unions[0]
    before = sum(1 for q in p0.positions if q < union.start)
    others = {p.owners[0]: p for p in layout.passes[1:]}
    assert set(others) == {"long", "mid"} and len(layout.passes) == 3
    for path, p in others.items():
        mod = layout.module(path)
        assert p.parent == 0 and p.prefix_len == before
        assert p.token_ids == mod.token_ids and p.positions == mod.positions
        assert set(p.owners) == {path}


def test_parameter_filler_is_encoded_but_owned_by_nobody():
    layout = compile_(TRIP)
    p0 = layout.passes[0]
    slot = layout.module("trip").slots["days"]
    i = p0.positions.index(slot.start)
    assert p0.token_ids[i:i + 5] == slot.filler and p0.owners[i:i + 5] == (None,) * 5
    assert list(p0.positions) == list(range(layout.length))


def test_nested_union_in_a_non_scaffold_member_gets_a_child_pass():
    layout = compile_(NESTED)
    by_owner = {p.owners[0] if p.owners else None: (i, p) for i, p in enumerate(layout.passes)}
    p0 = layout.passes[0]
    assert set(p0.owners) == {ROOT, "s", "s/inner", "after"}
    i_m, pass_m = by_owner["m"]
    outer = layout.unions[0]
    assert pass_m.parent == 0 and pass_m.prefix_len == sum(1 for q in p0.positions if q < outer.start)
    # m's pass runs m with its nested union at the scaffold v1, and m's own child.
    assert set(pass_m.owners) == {"m", "m/v1", "m/kid"}
    i_v2, pass_v2 = by_owner["m/v2"]
    nested = layout.unions[1]
    own_before = sum(1 for q in pass_m.positions if q < nested.start)
    assert pass_v2.parent == i_m
    assert pass_v2.prefix_len == pass_m.prefix_len + own_before
    assert pass_v2.positions == layout.module("m/v2").positions
    assert len(layout.passes) == 3


def test_role_blocks_render_in_the_chat_format():
    xml = '<schema name="r"><module name="sys"><system>Be brief.</system></module></schema>'
    chat = BUILTIN_FORMATS["chatml"]
    layout = compile_(xml, chat)
    assert layout.module("sys").token_ids == encode_markers(tok(), chat.wrap("system", "Be brief."))
    assert layout.chat is chat


def _built_nested():
    b = SchemaBuilder("n")
    b.text("Hello.\n")
    with b.union(scaffold="s"):
        with b.module("s"):
            b.text("Scaffold ")
            with b.module("inner"):
                b.text("inner text")
            b.text(" end of s.")
        with b.module("m"):
            b.text("Member one.\n")
            with b.union(scaffold="v1"):
                with b.module("v1"):
                    b.text("Go by air.")
                with b.module("v2"):
                    b.text("Go by water and the long way home.")
            b.text("\nMember tail.\n")
            with b.module("kid"):
                b.text("The kid module.")
    b.text("\n")
    with b.module("after"):
        b.text("After all.")
    return b.build()


def _built_trip():
    b = SchemaBuilder("trip")
    with b.module("trip"):
        b.text("Plan a trip lasting ").parameter("days", length=5).text(" days.")
    b.text("\n")
    with b.module("hint"):
        b.text("Plan for ").parameter("city", length=4, scaffold="the city").text(" now.")
    return b.build()


@pytest.mark.parametrize("xml, build", [(NESTED, _built_nested), (TRIP, _built_trip)])
def test_builder_gives_the_same_layout_as_xml(xml, build):
    schema = build()
    assert schema == parse_schema(xml)
    built, parsed = compile_schema(schema, tok(), PLAIN), compile_(xml)
    assert built == parsed


# ---- parameter filler, default scaffold, how a conversation starts ------------------------------


def test_parameter_slots_are_filled_with_plain_text_by_default():
    slot = compile_(TRIP).module("trip").slots["days"]
    assert slot.filler == encode_markers(tok(), " ") * 5
    unk = compile_schema(parse_schema(TRIP), tok(), PLAIN, param_filler=tok().unk_token)
    assert unk.module("trip").slots["days"].filler == (tok().unk_token_id,) * 5
    city = compile_schema(parse_schema(TRIP), tok(), PLAIN, param_filler="ab.").module("hint").slots["city"]
    given, dots = encode_markers(tok(), "the city"), encode_markers(tok(), "ab.")
    assert city.filler == given + (dots * 4)[: 4 - len(given)]


def test_a_filler_that_tokenizes_to_nothing_is_refused():
    with pytest.raises(PromptCacheError, match="param_filler ''"):
        compile_schema(parse_schema(TRIP), tok(), PLAIN, param_filler="")


def test_the_default_scaffold_is_the_longest_member_so_selecting_it_leaves_no_gap():
    layout = compile_(UNION.replace(' scaffold="short"', ""))
    (union,) = layout.unions
    assert union.scaffold == "long" and len(layout.module("long").token_ids) == union.length
    assert layout.module("after").start == layout.module("long").end + n_tokens("\n")
    p0 = layout.passes[0]
    assert list(p0.positions) == list(range(layout.length))


SMOL = ChatFormat("smol", {r: (f"<{r}>", "</>") for r in ("system", "user", "assistant")}, "<assistant>",
                  start="", default_system="<system>Default.</>")


def test_a_schema_with_role_blocks_starts_as_the_template_starts_a_conversation():
    # The template writes no BOS (start=""), so none is added although the tokenizer adds one.
    layout = compile_('<schema name="c">Intro. <module name="m"><user>Hi</user></module></schema>', SMOL)
    assert layout.module(ROOT).runs[0].token_ids == encode_markers(tok(), "<system>Default.</>Intro. ")
    layout = compile_('<schema name="c"><system>Mine.</system><user>Hi</user></schema>', SMOL)
    assert layout.module(ROOT).token_ids == encode_markers(tok(), "<system>Mine.</><user>Hi</>")
    assert layout.trailing_role == "user" and not layout.ends_after_system


def test_a_schema_without_role_blocks_starts_like_plain_text():
    layout = compile_('<schema name="c">Just text.</schema>', SMOL)
    assert layout.module(ROOT).token_ids == (tok().bos_token_id, *encode_markers(tok(), "Just text."))
    assert layout.trailing_role is None
