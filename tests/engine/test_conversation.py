"""`Conversation`: every turn reuses all earlier turns and answers as the uncached model would."""

from __future__ import annotations

from itertools import pairwise

import pytest

from .conftest import ARCHS, make_engine

TURNS = ("Plan a trip to the city.", "Which hotel is near the water?", "And the flight?")
N = 6


@pytest.fixture(scope="module", params=ARCHS)
def conv(request):
    """One three-turn conversation per architecture, shared by the read-only tests below."""
    conv = make_engine(request.param).chat(system="You plan trips.")
    for text in TURNS:
        conv.send(text, max_new_tokens=N)
    return conv


def test_messages_in_order(conv):
    roles = [m["role"] for m in conv.messages]
    assert roles == ["system"] + ["user", "assistant"] * len(TURNS)
    assert conv.messages[0]["content"] == "You plan trips."
    assert [m["content"] for m in conv.messages if m["role"] == "user"] == list(TURNS)


def test_each_turn_reuses_the_previous(conv):
    us = conv.usages
    assert len(us) == len(TURNS) and us[0].cached_tokens == 0
    for prev, cur in pairwise(us):
        # the previous prompt and its answer, as generated (the last answer token was never fed)
        assert cur.cached_tokens >= prev.input_tokens + prev.output_tokens - 1
        assert cur.input_tokens > prev.input_tokens


def test_usage_table_rows(conv):
    rows = conv.usage_rows()
    assert [r["turn"] for r in rows] == [1, 2, 3]
    for r, u in zip(rows, conv.usages, strict=True):
        assert (r["input"], r["cache_reads"], r["cache_writes"], r["output"]) == (
            u.input_tokens, u.cached_tokens, u.cache_write_tokens, u.output_tokens)
    lines = conv.usage_table().splitlines()
    assert len(lines) == 1 + len(TURNS) and "reads" in lines[0]
    for line, u in zip(lines[1:], conv.usages, strict=True):
        assert line.split()[:5] == [str(x) for x in (
            lines.index(line), u.input_tokens, u.cached_tokens, u.cache_write_tokens, u.output_tokens)]


def test_plot_usage_writes_png(conv, tmp_path):
    pytest.importorskip("matplotlib")
    path = conv.plot_usage(tmp_path / "u.png")
    assert path == tmp_path / "u.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_usage_has_integer_turns_a_title_and_every_series_in_the_legend(conv, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    seen = {}
    monkeypatch.setattr(plt, "close", lambda fig: seen.setdefault("fig", fig))
    conv.plot_usage(tmp_path / "u.png")
    ax = seen["fig"].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "3"]
    assert ax.get_title() == "Chat usage per turn (3 turns)"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "input: cache read", "input: computed", "cache write", "output", "time to first token", "total latency"]


def test_plot_usage_without_matplotlib_names_the_extra(conv, tmp_path, monkeypatch):
    import sys

    from promptcache.errors import PromptCacheError

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(PromptCacheError, match=r'plot_usage needs matplotlib.*pip install "promptcache\[plot\]"'):
        conv.plot_usage(tmp_path / "u.png")


def test_turns_equal_uncached_generate(conv):
    engine = conv.engine
    replies = [m for m in conv.messages if m["role"] == "assistant"]
    for i, reply in enumerate(replies):
        upto = conv.messages[: 2 + 2 * i]  # system + (user, assistant) * i + this user turn
        assert upto[-1]["role"] == "user"
        plain = engine.generate(upto, max_new_tokens=N, enable_cache=False)
        assert plain.text == reply["content"]
        assert plain.usage.input_tokens == conv.usages[i].input_tokens


def test_namespace_and_no_system():
    engine = make_engine("llama")
    a = engine.chat(namespace="a")
    assert a.messages == []
    first = a.send("Plan a trip.", max_new_tokens=N)
    b = engine.chat(namespace="b")
    other = b.send("Plan a trip.", max_new_tokens=N)
    assert other.usage.cached_tokens == 0 and other.token_ids == first.token_ids


def test_a_stateless_chat_reads_the_answer_it_generated():
    engine = make_engine("qwen2")  # a template-less tiny model: turn by turn
    first = [{"role": "user", "content": "Plan a trip."}]
    out = engine.generate(first, max_new_tokens=N)
    again = [*first, {"role": "assistant", "content": out.text}, {"role": "user", "content": "Why?"}]
    fed = engine.plan(again).token_ids
    prompt = engine.plan(first).token_ids
    assert fed[:len(prompt) + len(out.token_ids)] == prompt + out.token_ids  # the generated ids, not re-tokenized
    reply = engine.generate(again, max_new_tokens=N)
    assert reply.usage.cached_tokens >= len(prompt) + len(out.token_ids) - 1
    assert engine.answers.get("tenant-b", out.text) is None  # another tenant's answers are not looked up
    assert engine.generate(again, max_new_tokens=N, enable_cache=False).token_ids == reply.token_ids


def test_the_answer_memory_keeps_only_ids_that_spell_the_text():
    from promptcache.engine.answers import AnswerMemory

    engine = make_engine("llama")
    tok = engine.tokenizer
    memory = AnswerMemory(tok, max_entries=2)
    ids = tok.encode("Hello there", add_special_tokens=False)
    assert memory.remember("", "Hello there", ids) and memory.get("", "Hello there") == tuple(ids)
    assert not memory.remember("", "Hello", ids)  # ids that decode to other text
    assert memory.get("", "Hello") is None and memory.get("b", "Hello there") is None
    memory.remember("", "a", tok.encode("a", add_special_tokens=False))
    memory.remember("", "b", tok.encode("b", add_special_tokens=False))
    assert memory.get("", "Hello there") is None and len(memory) == 2  # least recently used dropped


def test_a_conversation_reads_its_answers_even_when_the_engine_forgot_them():
    from promptcache.engine.answers import AnswerMemory

    engine = make_engine("qwen2")
    engine.answers = AnswerMemory(engine.tokenizer, max_entries=1)  # room for one answer only
    a, b = engine.chat(), engine.chat()
    first = a.send("Plan a trip.", max_new_tokens=N)
    b.send("Something else entirely.", max_new_tokens=N)  # pushes a's answer out of the engine's memory
    second = a.send("Why?", max_new_tokens=N)
    assert second.usage.cached_tokens >= first.usage.input_tokens + first.usage.output_tokens - 1
