"""Retrieval over modules: `Engine.retrieve` and `<prompt retrieve="k">`."""

from __future__ import annotations

import pytest

from promptcache.embeddings import EmbeddingError
from promptcache.errors import PromptError, SchemaError
from promptcache.kv.disk import DiskStore

from ..embedders import BagOfWords
from .conftest import make_engine

KB = """<schema name="kb"><system>Answer from the documents.</system><user>Documents:
  <module name="leave">Annual leave: employees get 27 days of paid leave a year.</module>
  <module name="vpn">The VPN client is needed outside the office network.</module>
  <module name="parking">Parking: the garage under the office has 40 spaces.</module>
  <module name="greeting" cache="false">Hello.</module>
  <module name="form">Fill in <parameter name="who" length="4"/> on the expense form.</module>
  <union><module name="short">Be brief.</module><module name="long">Explain at length.</module></union>
</user></schema>"""
N = 4


def engine(embedder=None, **kw):
    e = make_engine("llama", embedder=embedder or BagOfWords(), **kw)
    e.add_schema(KB)
    return e


def test_retrieve_ranks_candidate_modules_by_meaning():
    e = engine()
    assert e.retrieve("kb", "how many days of paid leave do I get", k=1) == ["leave"]
    assert e.retrieve("kb", "is there parking in the garage", k=2)[0] == "parking"
    # only top-level cached modules without parameters outside unions are candidates
    assert sorted(e.retrieve("kb", "anything", k=10)) == ["leave", "parking", "vpn"]


def test_embeddings_are_computed_when_the_schema_is_added_and_reused():
    bag = BagOfWords()
    e = engine(bag)
    assert bag.calls == 3  # the three candidates, at add_schema
    e.retrieve("kb", "vpn", k=1)
    e.add_schema(KB)  # the same version again: nothing embedded again
    assert bag.calls == 4  # the question only


def test_prompt_retrieve_splices_the_nearest_modules_in_schema_order():
    e = engine()
    ask = "<user>Is there parking under the office, and how many days of paid leave?</user>"
    out = e.generate(f'<prompt schema="kb" retrieve="2">{ask}</prompt>', max_new_tokens=N)
    assert out.usage.modules_retrieved == ("leave", "parking")
    assert set(out.usage.modules_hit) >= {"leave", "parking"}
    by_hand = e.generate(f'<prompt schema="kb"><parking/><leave/>{ask}</prompt>', max_new_tokens=N)
    assert out.token_ids == by_hand.token_ids and by_hand.usage.modules_retrieved == ()
    # a module the prompt selects itself is not retrieved again
    mixed = e.generate(f'<prompt schema="kb" retrieve="2"><leave/>{ask}</prompt>', max_new_tokens=N)
    assert mixed.usage.modules_retrieved == ("parking",) and mixed.token_ids == out.token_ids


def test_module_embeddings_are_stored_under_the_module_state_keys(tmp_path):
    bag = BagOfWords()
    engine(bag, store_dir=tmp_path)
    states = set(DiskStore(tmp_path).keys())
    embedded = {p.name.removesuffix(".embedding.json") for p in tmp_path.glob("*/*.embedding.json")}
    assert len(embedded) == 3 and embedded <= states
    again = BagOfWords()
    engine(again, store_dir=tmp_path)
    assert again.calls == 0  # loaded, not computed
    for path in tmp_path.glob("*/*.embedding.json"):
        path.write_text(path.read_text().replace("0.0", "0.5", 1))  # a hand edit: checksum fails
    third = BagOfWords()
    assert engine(third, store_dir=tmp_path).retrieve("kb", "vpn", k=1) == ["vpn"]
    assert third.calls == 3 + 1  # computed again, and the question


@pytest.mark.parametrize("question, k, culprit", [
    ("", 3, "question"), (None, 3, "question"), ("vpn", 0, "k=0"), ("vpn", 65, "k=65"), ("vpn", "3", "k='3'"),
    ("vpn", True, "k=True"),
])
def test_bad_arguments_name_the_culprit(question, k, culprit):
    e = engine()
    with pytest.raises(PromptError, match=culprit):
        e.retrieve("kb", question, k=k)
    with pytest.raises(PromptError, match="unknown schema 'nope'"):
        e.retrieve("nope", "vpn")
    assert e.retrieve("kb", "vpn", k=1) == ["vpn"]  # and it keeps serving


@pytest.mark.parametrize("prompt, error, culprit", [
    ('<prompt schema="kb" retrieve="0"><user>vpn?</user></prompt>', SchemaError, "retrieve="),
    ('<prompt schema="kb" retrieve="two"><user>vpn?</user></prompt>', SchemaError, "'two'"),
    ('<prompt schema="kb" retrieve="2"><leave/></prompt>', PromptError, "needs a question"),
])
def test_bad_retrieve_prompts_name_the_culprit(prompt, error, culprit):
    e = engine()
    with pytest.raises(error, match=culprit):
        e.generate(prompt, max_new_tokens=N)


def test_without_an_embedder_retrieve_says_what_to_install(tmp_path):
    e = engine(embedder=str(tmp_path))  # no checkpoint there: add_schema still works
    with pytest.raises(EmbeddingError, match="checkpoint"):
        e.retrieve("kb", "vpn")


def test_retrieved_prompts_recompute_stale_states_by_default():
    ask = '<prompt schema="kb" retrieve="1"><user>Is there parking in the garage under the office?</user></prompt>'
    e = engine()
    out = e.generate(ask, max_new_tokens=N)
    assert out.usage.modules_retrieved == ("parking",)
    assert out.usage.recomputed_tokens > 0  # "parking" was encoded after "leave" and "vpn", skipped here
    assert out.token_ids == e.generate(ask, max_new_tokens=N, enable_cache=False).token_ids
    assert e.generate(ask, max_new_tokens=N, recompute=0.0).usage.recomputed_tokens == 0  # the request's own
    assert engine(retrieved_recompute=0.0).generate(ask, max_new_tokens=N).usage.recomputed_tokens == 0
    with pytest.raises(PromptError, match="recompute"):
        engine(retrieved_recompute=2.0)
