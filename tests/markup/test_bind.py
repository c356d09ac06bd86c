"""Prompt binding: which stored modules a prompt splices, which tokens it computes, and its errors."""

from __future__ import annotations

import functools

import pytest

from promptcache.errors import PromptError
from promptcache.markup.bind import bind
from promptcache.markup.chat import BUILTIN_FORMATS, ChatFormat
from promptcache.markup.layout import ROOT, PromptPlan, SchemaLayout, compile_schema
from promptcache.markup.parse import parse_prompt, parse_schema
from promptcache.markup.tokens import encode_markers
from promptcache.testing import tiny_tokenizer

SCHEMA = """
<schema name="travel">
  You are a travel planner.
  <module name="trip">Plan a trip lasting <parameter name="days" length="4"/> days.
    <union>
      <module name="domestic">Stay in the country.</module>
      <module name="overseas">Bring a passport and <module name="visa">a visa</module> too.</module>
    </union>
  </module>
  <module name="live" cache="false">Today is the day.</module>
  <module name="city">The city has a hotel.</module>
  <module name="none"/>
</schema>
"""


@functools.cache
def tok():
    return tiny_tokenizer()


@functools.cache
def layout(chat: str = "falcon") -> SchemaLayout:
    return compile_schema(parse_schema(SCHEMA), tok(), BUILTIN_FORMATS[chat])


def plan_of(body: str, chat: str = "falcon", schema: str = "travel") -> PromptPlan:
    return bind(parse_prompt(f'<prompt schema="{schema}">{body}</prompt>'), layout(chat), tok())


def ids(text: str) -> tuple[int, ...]:
    """`text` tokenized as one string, special tokens' strings (the formats' markers) as control ids."""
    return encode_markers(tok(), text)


def test_positions_are_sorted_and_tokens_sit_where_the_layout_put_them():
    plan = plan_of('<city/><trip days="3"><overseas><visa/></overseas></trip>Go?')
    assert list(plan.positions) == sorted(set(plan.positions))
    at = dict(zip(plan.positions, plan.token_ids, strict=True))
    for path in plan.modules:
        mod = layout().module(path)
        assert all(at[p] == t for p, t in zip(mod.positions, mod.token_ids, strict=True))
    assert plan.modules[0] == ROOT and set(plan.modules) == {ROOT, "city", "trip", "trip/overseas",
                                                             "trip/overseas/visa"}
    # Cached modules are spliced in position order; the unselected domestic/live leave gaps.
    assert plan.cached == (ROOT, "trip", "trip/overseas", "trip/overseas/visa", "city")
    live = layout().module("live")
    assert set(plan.positions).isdisjoint(live.positions)


def test_cached_and_new_tokens():
    plan = plan_of('<trip days="3"><domestic/></trip><live/>Go?')
    slot = layout().module("trip").slots["days"]
    live = layout().module("live")
    arg = ids("3") + layout().filler * (slot.length - len(ids("3")))  # padded with the filler
    tail = ids("Go?")
    expected_new = list(zip(range(slot.start, slot.start + slot.length), arg, strict=True))
    expected_new += list(zip(live.positions, live.token_ids, strict=True))
    expected_new += list(zip(range(layout().length, layout().length + len(tail)), tail, strict=True))
    assert list(zip(plan.new_positions, plan.new_token_ids, strict=True)) == expected_new
    assert "live" not in plan.cached and plan.cached == (ROOT, "trip", "trip/domestic")
    cached = sum(len(layout().module(p).token_ids) for p in plan.cached)
    assert plan.cached_token_count == cached == len(plan.token_ids) - len(plan.new_token_ids)
    assert set(range(slot.start, slot.start + slot.length)) <= set(plan.positions)


def test_tail_follows_the_end_of_the_schema():
    plan = plan_of("<city/>What now?")
    tail = ids("What now?")
    n = len(tail)
    assert plan.new_positions == tuple(range(layout().length, layout().length + n))
    assert plan.new_token_ids == tail
    assert plan.next_position == layout().length + n
    assert plan.positions[-n:] == plan.new_positions


def test_generation_prompt_after_a_final_user_turn():
    chat = BUILTIN_FORMATS["falcon"]
    plan = plan_of("<city/><user>Where?</user>")
    assert plan.new_token_ids == ids(chat.wrap("user", "Where?") + chat.generation_prompt)
    assert plan.stop == chat.stop
    # Not after an assistant turn, nor when free text follows the user turn.
    plan = plan_of("<city/><user>Where?</user><assistant>Here.</assistant>")
    assert plan.new_token_ids == ids(chat.wrap("user", "Where?") + chat.wrap("assistant", "Here."))
    plan = plan_of("<city/><user>Where?</user>Think.")
    assert plan.new_token_ids == ids(chat.wrap("user", "Where?") + "Think.")


def test_no_tail_ends_at_the_schema_end():
    plan = plan_of("<city/>")
    assert plan.new_token_ids == () and plan.next_position == layout().length


def test_an_empty_module_is_selected_but_not_spliced():
    plan = plan_of("<none/><city/>Go")
    assert "none" in plan.modules and "none" not in plan.cached


def prompt_error(body: str, schema: str = "travel") -> str:
    with pytest.raises(PromptError) as info:
        plan_of(body, schema=schema)
    return str(info.value)


@pytest.mark.parametrize("body, culprit, valid", [
    ("<bogus/>", "'bogus'", ["trip", "live", "city", "none"]),
    ('<trip days="3"><nope/></trip>', "'nope'", ["domestic", "overseas"]),
    ('<trip days="3"><overseas><visa/><stamp/></overseas></trip>', "'stamp'", ["visa"]),
    ("<visa/>", "'visa'", ["trip", "city"]),
])
def test_unknown_module_names_it_and_the_valid_ones(body, culprit, valid):
    msg = prompt_error(body)
    assert culprit in msg and "travel" in msg
    assert all(name in msg.split("valid modules there:")[1] for name in valid), msg


def test_two_members_of_one_union():
    msg = prompt_error('<trip days="3"><domestic/><overseas/></trip>')
    assert "'domestic'" in msg and "'overseas'" in msg
    assert "domestic, overseas" in msg


def test_module_selected_twice():
    msg = prompt_error("<city/><city/>")
    assert "'city'" in msg and "twice" in msg


def test_unknown_parameter():
    msg = prompt_error('<trip days="3" nights="2"/>')
    assert "'nights'" in msg and "'trip'" in msg and "days" in msg.split("parameters:")[1]


def test_missing_argument():
    msg = prompt_error("<trip/>")
    assert "days" in msg and "'trip'" in msg


def test_argument_longer_than_its_parameter():
    arg = "seven very long days of travel by water"
    n = len(ids(arg))
    assert n > 4
    msg = prompt_error(f'<trip days="{arg}"/>')
    assert f"{n} tokens" in msg and "4 tokens" in msg and "'days'" in msg


def test_prompt_for_another_schema():
    msg = prompt_error("<city/>", schema="other")
    assert "'other'" in msg and "'travel'" in msg


def test_padded_arguments_fill_their_slot_with_the_filler():
    plan = plan_of('<trip days="3"/>Go')  # padded by default
    slot = layout().module("trip").slots["days"]
    at = dict(zip(plan.positions, plan.token_ids, strict=True))
    arg = ids("3")
    assert [at[p] for p in range(slot.start, slot.start + slot.length)] == \
        list(arg + layout().filler * (slot.length - len(arg)))
    unpadded = bind(parse_prompt('<prompt schema="travel"><trip days="3"/>Go</prompt>'), layout(), tok(),
                    pad_arguments=False)
    assert slot.start + len(arg) not in unpadded.positions  # a gap where the argument is short
    assert len(plan.token_ids) == len(unpadded.token_ids) + slot.length - len(arg)


def test_a_user_turn_right_after_the_schemas_system_turn_opens_as_the_format_says():
    fmt = ChatFormat("merged", {"system": ("<s>[INST] <<SYS>>", "<</SYS>>"), "user": ("<s>[INST] ", " [/INST]"),
                                "assistant": (" ", " </s>")}, user_after_system="")
    schema = compile_schema(parse_schema('<schema name="m"><system>S</system></schema>'), tok(), fmt)
    plan = bind(parse_prompt('<prompt schema="m"><user>Q</user></prompt>'), schema, tok())
    assert plan.new_token_ids == ids("Q [/INST]")
    plan = bind(parse_prompt('<prompt schema="m">Note.<user>Q</user></prompt>'), schema, tok())
    assert plan.new_token_ids == ids("Note.<s>[INST] Q [/INST]")
