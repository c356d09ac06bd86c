"""The disk module store: written once, loaded by later engines of the same identity only, and pinning."""

from __future__ import annotations

import pytest
import torch

import promptcache as pc
from promptcache.engine import modules as modules_module
from promptcache.errors import PromptError

from .conftest import ALL_DOCS_PROMPT, DOCS, make_engine

N = 6


@pytest.fixture
def encodes(monkeypatch) -> list[set[str] | None]:
    """Every `want` passed to encode_schema by the engine (None: all modules)."""
    calls: list[set[str] | None] = []
    real = modules_module.encode_schema

    def counting(adapter, layout, want=None, **kw):
        calls.append(None if want is None else set(want))
        return real(adapter, layout, want, **kw)

    monkeypatch.setattr(modules_module, "encode_schema", counting)
    return calls


def _cacheable(layout) -> set[str]:
    return {p for p, m in layout.modules.items() if m.cache and m.token_ids}


def _engine(arch, store, **kw) -> pc.Engine:
    return make_engine(arch, store_dir=store, **kw)


def _answer(engine) -> tuple[int, ...]:
    return engine.generate(ALL_DOCS_PROMPT, max_new_tokens=N).token_ids


def test_second_engine_loads_instead_of_encoding(arch, tmp_path, encodes):
    a = _engine(arch, tmp_path)
    layout = a.add_schema(DOCS)
    assert encodes == [None]
    assert len(a.disk.keys()) == len(_cacheable(layout))
    assert {a.disk.meta(k)["module"] for k in a.disk.keys()} == _cacheable(layout)
    expected = _answer(a)

    b = _engine(arch, tmp_path)
    b.add_schema(DOCS)
    out = b.generate(ALL_DOCS_PROMPT, max_new_tokens=N)
    assert encodes == [None], "engine B re-encoded instead of loading"
    assert out.token_ids == expected and out.usage.modules_written == ()
    assert out.token_ids == b.generate(ALL_DOCS_PROMPT, max_new_tokens=N, enable_cache=False).token_ids


def test_other_model_does_not_load(arch, tmp_path, encodes):
    a = _engine(arch, tmp_path)
    a.add_schema(DOCS)
    keys_a = set(a.disk.keys())
    model, tok = pc.testing.tiny_model(arch, seed=1)
    other = pc.Engine(model, tok, progress=False, store_dir=tmp_path)
    other.add_schema(DOCS)
    assert encodes == [None, None]
    keys = set(other.disk.keys())
    assert keys_a < keys and len(keys - keys_a) == len(keys_a)
    out = other.generate(ALL_DOCS_PROMPT, max_new_tokens=N)
    assert out.token_ids == other.generate(ALL_DOCS_PROMPT, max_new_tokens=N, enable_cache=False).token_ids


def test_dtype_and_chat_format_change_keys(tmp_path):
    base = _engine("llama", tmp_path)
    base.add_schema(DOCS)
    seen = set(base.disk.keys())
    n = len(seen)
    model, tok = pc.testing.tiny_model("llama", seed=0, dtype=torch.float64)
    variants = [pc.Engine(model, tok, progress=False, store_dir=tmp_path),
                _engine("llama", tmp_path, chat_format="chatml")]
    for engine in variants:
        engine.add_schema(DOCS)
        keys = set(engine.disk.keys())
        assert len(keys - seen) == n, engine.identity
        seen = keys


def test_corrupt_file_reencodes_only_that_module(arch, tmp_path, encodes):
    a = _engine(arch, tmp_path)
    a.add_schema(DOCS)
    expected = _answer(a)
    key = next(k for k in a.disk.keys() if a.disk.meta(k)["module"] == "code")
    path = a.disk.path(key)
    path.write_bytes(path.read_bytes()[:-100])

    c = _engine(arch, tmp_path)
    c.add_schema(DOCS)
    assert encodes == [None, {"code"}]
    assert path.exists(), "the re-encoded module is written back"
    assert _answer(c) == expected


def test_evicted_modules_reload_from_disk(arch, tmp_path, encodes):
    engine = _engine(arch, tmp_path)
    engine.add_schema(DOCS)
    expected = _answer(engine)
    for key in engine.store.keys():
        engine.store.remove(key)
    out = engine.generate(ALL_DOCS_PROMPT, max_new_tokens=N)
    assert encodes == [None] and out.usage.modules_written == ()
    assert out.token_ids == expected


def test_zero_budget_reloads_from_disk(tmp_path, encodes):
    engine = _engine("llama", tmp_path, device_budget_bytes=0, host_budget_bytes=0)
    engine.add_schema(DOCS)
    reference = make_engine("llama")
    reference.add_schema(DOCS)
    expected = _answer(reference)
    del encodes[1:]
    out = engine.generate(ALL_DOCS_PROMPT, max_new_tokens=N)
    assert out.token_ids == expected
    assert encodes[1:] == [], f"re-encoded {encodes[1:]} although every module is on disk"


def test_pin_keeps_module_resident(arch):
    engine = make_engine(arch)
    engine.add_schema(DOCS)
    engine.pin("docs", "intro")
    small = make_engine(arch, device_budget_bytes=0, host_budget_bytes=engine.module_states("docs", "intro").nbytes)
    small.add_schema(DOCS)
    # NOTE: pinning needs the module resident (see test_pin_of_evicted_module): use it first.
    small.generate('<prompt schema="docs"><intro/>Why?</prompt>', max_new_tokens=2)
    small.pin("docs", "intro")
    for other in ("code", "notes"):
        prompt = f'<prompt schema="docs"><{other}/>Why?</prompt>'
        small.generate(prompt, max_new_tokens=2)
        assert small.module_tier("docs", "intro") == "host"
    out = small.generate(ALL_DOCS_PROMPT, max_new_tokens=N)
    assert "intro" in out.usage.modules_hit and "intro" not in out.usage.modules_written


def test_pin_of_evicted_module():
    """Pinning a module that the budget already dropped should bring it back, not fail."""
    engine = make_engine("llama", device_budget_bytes=0, host_budget_bytes=0)
    engine.add_schema(DOCS)
    engine.pin("docs", "intro")
    assert engine.module_tier("docs", "intro") == "host"


def test_pin_unknown_module_lists_cached(engine):
    engine.add_schema(DOCS)
    with pytest.raises(PromptError) as e:
        engine.pin("docs", "nope")
    for name in ("'nope'", "intro", "code", "notes"):
        assert name in str(e.value)
    with pytest.raises(PromptError, match="unknown schema"):
        engine.pin("missing", "intro")


def _edited_off_grid(arch):
    """The same tiny model with embedding values changed at indices a strided sample skips."""
    from promptcache.testing import tiny_model

    model, tok = tiny_model(arch, seed=0)
    emb = model.get_input_embeddings().weight
    step = max(1, emb.numel() // 4096)
    assert step > 1, "the tiny embedding must be larger than the sample for this test to mean anything"
    with torch.no_grad():
        emb.view(-1)[1:step * 419:step] += 0.5  # 419 values, none on the sample grid (multiples of step)
    return model, tok


def test_weights_changed_off_the_sample_grid_get_other_keys(arch, tmp_path):
    first = _engine(arch, tmp_path)
    first.add_schema(DOCS)
    model, tok = _edited_off_grid(arch)
    edited = pc.Engine(model, tok, store_dir=tmp_path, progress=False)
    assert edited.identity["weights"] != first.identity["weights"]
    expected = pc.Engine(model, tok, progress=False)
    expected.add_schema(DOCS)
    edited.add_schema(DOCS)
    assert _answer(edited) == _answer(expected)
    sampled = [pc.Engine(m, t, fingerprint="sampled", progress=False).identity["weights"]
               for m, t in ((first.model, first.tokenizer), (model, tok))]
    assert sampled[0] == sampled[1], "the documented limit of the opt-in sampled fingerprint"


def test_a_full_disk_never_fails_a_request(arch, tmp_path, monkeypatch):
    import errno
    import os

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    engine = make_engine(arch, store_dir=tmp_path / "states", response_cache_dir=tmp_path / "responses",
                         device_budget_bytes=0, host_budget_bytes=0)  # every request re-encodes its modules
    monkeypatch.setattr(os, "replace", full)
    engine.add_schema(DOCS)  # encodes, fails to save: the states are still used
    streamed = list(engine.stream(ALL_DOCS_PROMPT, max_new_tokens=N))
    answer = engine.generate(ALL_DOCS_PROMPT, max_new_tokens=N)
    monkeypatch.undo()
    assert "".join(c.text for c in streamed) == answer.text and streamed[-1].usage is not None
    assert answer.token_ids == _reference(arch)
    assert engine.disk.write_failures > 0 and engine.responses.write_failures > 0


def _reference(arch) -> tuple[int, ...]:
    engine = make_engine(arch)
    engine.add_schema(DOCS)
    return _answer(engine)


def test_stored_states_that_are_not_the_module_are_a_miss(arch, tmp_path):
    """A file under the right key holding another module's states (a bug, or a hand-copied file) is not used."""
    first = _engine(arch, tmp_path)
    first.add_schema(DOCS)
    files = {p.name: p for p in tmp_path.rglob("*.safetensors") if p.is_file()}  # not the module embeddings
    wrong = first.module_states("docs", "notes")
    for path in files.values():  # every file now holds the notes module's states, with valid checksums
        first.disk.save(_key_of(first, path), wrong)
    second = _engine(arch, tmp_path)
    second.add_schema(DOCS)
    assert _answer(second) == _answer(make_engine_with_docs(arch))


def _key_of(engine, path):
    return next(k for k in engine.disk.keys() if engine.disk.path(k) == path)


def make_engine_with_docs(arch):
    engine = make_engine(arch)
    engine.add_schema(DOCS)
    return engine


def test_the_chat_formats_every_field_is_part_of_the_identity():
    from dataclasses import replace

    model, tok = pc.testing.tiny_model("llama", seed=0)
    base = pc.Engine(model, tok, chat_format="chatml", progress=False).chat_format
    changes = {"stop": ("<x>",), "start": "<s>", "default_system": "Be nice.", "user_after_system": "",
               "template": "{{ messages }}", "generation_prompt": "<bot>"}
    seen = {pc.Engine(model, tok, chat_format=base, progress=False).identity["chat"]}
    for field, value in changes.items():
        seen.add(pc.Engine(model, tok, chat_format=replace(base, **{field: value}), progress=False).identity["chat"])
    assert len(seen) == 1 + len(changes)


def test_schema_added_says_what_was_encoded_loaded_and_saved(tmp_path):
    first = _engine("llama", tmp_path)
    layout = first.add_schema(DOCS)
    added = first.schema_added(layout.name)
    assert set(added.encoded) == _cacheable(layout) and added.loaded == ()
    assert added.encode_s > 0 and added.stored_encode_s == 0 and added.seconds >= added.encode_s
    second = _engine("llama", tmp_path)
    second.add_schema(DOCS)
    again = second.schema_added(layout.name)
    assert again.encoded == () and set(again.loaded) == _cacheable(layout)
    # each file records its module's share of the encode time: together, the first engine's encode time
    assert again.stored_encode_s == pytest.approx(added.encode_s, rel=1e-3, abs=1e-3)
    with pytest.raises(PromptError, match="unknown schema 'nope'"):
        second.schema_added("nope")


def test_schema_added_without_a_store_encodes_every_time():
    engine = make_engine("llama")
    layout = engine.add_schema(DOCS)
    assert set(engine.schema_added(layout.name).encoded) == _cacheable(layout)
    assert make_engine("llama").add_schema(DOCS) and engine.schema_added(layout.name).loaded == ()
