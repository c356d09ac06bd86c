"""Redefining a schema: requests keep the version they were planned against; nothing stale is stored."""

from __future__ import annotations

import pytest

from .conftest import make_engine

OLD = '<schema name="s"><module name="doc">The first document talks about the city and its hotel.</module></schema>'
# Same token count on the tiny tokenizers would be a coincidence; a different length is the crash case.
NEW = ('<schema name="s"><module name="doc">A list of what people said about water, air and the earth, '
       'and a long trip by train.</module></schema>')
SAME_LENGTH = OLD.replace("city", "town")
PROMPT = '<prompt schema="s"><doc/>What is it about?</prompt>'


def _answer(engine, prompt=PROMPT):
    return engine.generate(prompt, max_new_tokens=6, ignore_eos=True).token_ids


@pytest.mark.parametrize("new", [NEW, SAME_LENGTH], ids=["other_length", "same_length"])
def test_request_planned_before_a_redefinition_keeps_its_version(arch, new):
    engine, old_only, new_only = make_engine(arch), make_engine(arch), make_engine(arch)
    engine.add_schema(OLD)
    old_only.add_schema(OLD)
    new_only.add_schema(new)
    plan = engine.plan(PROMPT)
    engine.store.remove(plan.schema.key("doc"))  # evicted: the old request must re-encode its module
    engine.add_schema(new)
    with engine.prefill(plan) as pre, old_only.prefill(old_only.plan(PROMPT)) as expected:
        assert pre.modules_written == ("doc",)
        assert (pre.logits - expected.logits).abs().max() < 1e-4
    # The old version's re-encoded states were not stored under the new version's keys.
    assert _answer(engine) == _answer(new_only)
    assert engine.module_states("s", "doc").token_ids == new_only.module_states("s", "doc").token_ids


def test_redefinition_survives_a_restart_with_a_shared_store(arch, tmp_path):
    first = make_engine(arch, store_dir=tmp_path)
    first.add_schema(OLD)
    first.add_schema(NEW)
    restarted = make_engine(arch, store_dir=tmp_path)
    restarted.add_schema(NEW)
    fresh = make_engine(arch)
    fresh.add_schema(NEW)
    assert _answer(restarted) == _answer(fresh)


def test_identical_re_add_keeps_states_and_pins(arch):
    two = OLD.replace("</schema>", '<module name="other">Notes on water, air and the earth.</module></schema>')
    probe = make_engine(arch)
    probe.add_schema(two)
    room = max(probe.module_states("s", m).nbytes for m in ("doc", "other"))
    engine = make_engine(arch, device_budget_bytes=0, host_budget_bytes=room)  # room for one module
    engine.add_schema(two)
    engine.generate('<prompt schema="s"><doc/>Why?</prompt>', max_new_tokens=1)
    engine.pin("s", "doc")
    states = engine.module_states("s", "doc")
    engine.add_schema(two)
    assert engine.module_states("s", "doc") is states, "re-adding an identical schema re-encoded it"
    out = engine.generate('<prompt schema="s"><other/>Why?</prompt>', max_new_tokens=1)
    assert "doc" not in out.usage.modules_written
    assert engine.module_states("s", "doc") is states, "the pin was lost"


def test_failed_add_leaves_the_previous_version(arch, monkeypatch):
    from promptcache.engine import modules

    engine = make_engine(arch)
    engine.add_schema(OLD)
    before = _answer(engine)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(modules, "encode_schema", full_disk)
    with pytest.raises(OSError):
        engine.add_schema(NEW)
    monkeypatch.undo()
    assert engine.schema("s").modules["doc"].token_ids == make_engine(arch).add_schema(OLD).modules["doc"].token_ids
    assert _answer(engine) == before
