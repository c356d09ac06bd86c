"""Adding a schema holds up no request (issue 27, finding 1: `add` encoded under the registry lock).

An encode is held open at will: a forward pre-hook on the model's input embeddings blocks the
adding thread (and only it) until the test lets it go. Requests on other schemas, and on the
version being replaced, must complete meanwhile; adds of one name still end in one version.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from .conftest import ALL_DOCS_PROMPT, DOCS, make_engine

DOCS_V2 = DOCS.replace("water, air and the earth", "fire, ice and the moon")
DOCS_V3 = DOCS.replace("water, air and the earth", "stone, sand and the sea")
OTHER = '<schema name="other">Be brief. <module name="doc">A note about trains and their stations.</module></schema>'
OTHER_PROMPT = '<prompt schema="other"><doc/>Where do trains stop?</prompt>'
WAIT_S = 60  # only reached when a request is stuck behind the add: the failure this file guards


class EncodeGate:
    """Blocks every forward run by the thread named `thread_name` until `release` is set."""

    def __init__(self, engine, thread_name: str):
        self.entered, self.release = threading.Event(), threading.Event()
        self._name = thread_name
        self._hook = engine.model.get_input_embeddings().register_forward_pre_hook(self._block)

    def _block(self, module, args) -> None:
        if threading.current_thread().name == self._name:
            self.entered.set()
            self.release.wait()

    def close(self) -> None:
        self.release.set()
        self._hook.remove()


def start_add(engine, schema: str, name: str) -> tuple[threading.Thread, list]:
    errors: list[BaseException] = []

    def add() -> None:
        try:
            engine.add_schema(schema)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    thread = threading.Thread(target=add, name=name)
    thread.start()
    return thread, errors


@pytest.mark.parametrize("arch", ["llama", "mpt"])
def test_requests_complete_while_a_schema_is_being_encoded(arch):
    engine = make_engine(arch)
    engine.add_schema(DOCS)
    engine.add_schema(OTHER)
    before = [engine.generate(p, max_new_tokens=4).token_ids for p in (ALL_DOCS_PROMPT, OTHER_PROMPT)]
    gate = EncodeGate(engine, "adder")
    adder, errors = start_add(engine, DOCS_V2, "adder")  # replaces docs: its notes module changed
    with ThreadPoolExecutor(max_workers=1) as pool:
        try:
            assert gate.entered.wait(WAIT_S), "the add never reached its encode"
            during = pool.submit(lambda: [engine.generate(p, max_new_tokens=4).token_ids
                                          for p in (ALL_DOCS_PROMPT, OTHER_PROMPT)])
            # the previous version of docs, and the other schema, answer while the add is still held
            assert during.result(timeout=WAIT_S) == before
            assert adder.is_alive(), "the add is still encoding"
        finally:
            gate.close()  # before the pool waits for a request stuck behind the add
    adder.join()
    assert errors == []
    after = make_engine(arch)
    assert engine.schema("docs").modules["notes"].token_ids == after.add_schema(DOCS_V2).modules["notes"].token_ids
    assert engine.generate(ALL_DOCS_PROMPT, max_new_tokens=4).token_ids == \
        after.generate(ALL_DOCS_PROMPT, max_new_tokens=4).token_ids


def test_adds_of_one_name_end_in_the_last_started_version_with_its_states():
    engine = make_engine("llama")
    engine.add_schema(DOCS)
    gate = EncodeGate(engine, "first")
    try:
        first, errors1 = start_add(engine, DOCS_V2, "first")
        assert gate.entered.wait(WAIT_S)
        second, errors2 = start_add(engine, DOCS_V3, "second")  # waits for the first add's turn
        second.join(timeout=1.0)
    finally:
        gate.close()
    first.join()
    second.join()
    assert errors1 == errors2 == []
    layout = engine.schema("docs")
    assert layout.modules["notes"].token_ids == make_engine("llama").add_schema(DOCS_V3).modules["notes"].token_ids
    cached = [p for p, m in layout.modules.items() if m.cache and m.token_ids]
    assert all(engine.module_states("docs", p) is not None for p in cached)
    assert len(engine.store.keys()) == len(cached)  # the replaced versions' notes states are gone


def test_concurrent_adds_of_one_name_leave_one_version_and_only_its_states():
    engine = make_engine("llama")
    versions = [DOCS, DOCS_V2, DOCS_V3] * 3
    with ThreadPoolExecutor(max_workers=3) as pool:
        list(pool.map(engine.add_schema, versions))
    layout = engine.schema("docs")
    cached = [p for p, m in layout.modules.items() if m.cache and m.token_ids]
    assert all(engine.module_states("docs", p) is not None for p in cached)
    assert len(engine.store.keys()) == len(cached)
