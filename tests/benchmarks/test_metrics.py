"""LongBench metrics against hand-computed values."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import metrics
from benchmarks.metrics import (
    DATASET_METRIC,
    classification_score,
    code_sim_score,
    count_score,
    exact_match,
    normalize_answer,
    qa_f1_score,
    retrieval_score,
    rouge_l_score,
    score,
    token_f1,
)

TREC_CLASSES = ["location", "other location", "person"]


@pytest.mark.parametrize("text, expected", [
    ("The Cat, sat on a mat!", "cat sat on mat"),
    ("  An   apple\tA DAY ", "apple day"),
    ("theatre", "theatre"),            # articles only as whole words
    ("U.S.A.", "usa"),
    ("", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize("prediction, truth, expected", [
    ("the cat sat", "a cat sat down", 0.8),       # P=1, R=2/3
    ("Paris", "paris, France", 2 / 3),            # P=1, R=1/2
    ("dog dog", "dog", 2 / 3),                    # repeated tokens count once each side
    ("blue", "red", 0.0),
    ("", "red", 0.0),
    ("The Eiffel Tower.", "eiffel tower", 1.0),
])
def test_qa_f1_score(prediction, truth, expected):
    assert qa_f1_score(prediction, truth) == pytest.approx(expected)


@pytest.mark.parametrize("prediction, truth, expected", [
    ("police killed the gunman", "the gunman was shot by police", 0.4),  # LCS "the gunman": P=1/2, R=1/3
    ("a b c d", "a c b d", 0.75),                                        # LCS 3 of 4 both ways
    ("Same words here.", "same words here", 1.0),
    ("x y", "z", 0.0),
    ("", "anything", 0.0),
])
def test_rouge_l_score(prediction, truth, expected):
    assert rouge_l_score(prediction, truth) == pytest.approx(expected)


@pytest.mark.parametrize("prediction, truth, expected", [
    ("other location", "other location", 1.0),    # "location" is inside the truth: discarded
    ("location or person", "person", 0.5),
    ("location or person", "location", 0.5),
    ("person", "location", 0.0),
    ("no idea", "person", 0.0),
])
def test_classification_score(prediction, truth, expected):
    assert classification_score(prediction, truth, TREC_CLASSES) == pytest.approx(expected)


def test_classification_score_needs_classes():
    with pytest.raises(ValueError, match="all_classes"):
        classification_score("person", "person", None)


@pytest.mark.parametrize("prediction, expected", [
    ("Paragraph 3", 1.0),
    ("Paragraph 3 or Paragraph 12", 0.5),
    ("Paragraph 13", 0.0),
    ("I do not know", 0.0),
])
def test_retrieval_score(prediction, expected):
    assert retrieval_score(prediction, "Paragraph 3") == pytest.approx(expected)


def test_retrieval_score_rejects_malformed_truth():
    with pytest.raises(ValueError, match="Paragraph N"):
        retrieval_score("3", "three")


def test_count_score():
    assert count_score("There are 5 unique paragraphs out of 7", "5") == pytest.approx(0.5)
    assert count_score("5", "5") == 1.0
    assert count_score("five", "5") == 0.0


@pytest.mark.parametrize("prediction, truth, expected", [
    ("```python\nx = 1\n```", "x = 1", 1.0),      # fence line skipped
    ("abcd", "abce", 0.75),                        # 2*3/8
    ("# comment\nreturn a", "return b", 0.875),    # 2*7/16
    ("\n\nreturn a", "return a", 1.0),
])
def test_code_sim_score(prediction, truth, expected):
    assert code_sim_score(prediction, truth) == pytest.approx(expected)


def test_exact_match():
    assert exact_match("The Eiffel Tower.", "eiffel tower") == 1.0
    assert exact_match("Eiffel Tower in Paris", "eiffel tower") == 0.0


def test_token_f1_is_symmetric_and_empty_outputs_agree():
    assert token_f1("a b c", "b c d") == pytest.approx(token_f1("b c d", "a b c"))
    assert token_f1("", "") == 1.0
    assert token_f1("", "something") == 0.0
    assert token_f1("cat sat", "cat sat") == 1.0


def test_dataset_metric_covers_longbench_english():
    assert set(DATASET_METRIC) == {
        "narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "gov_report",
        "qmsum", "multi_news", "trec", "triviaqa", "samsum", "passage_retrieval_en", "passage_count",
        "lcc", "repobench-p"}


def test_score_takes_max_over_answers():
    assert score("hotpotqa", "Paris", ["London", "paris France"]) == pytest.approx(2 / 3)
    assert score("hotpotqa", "Paris", []) == 0.0


def test_score_keeps_first_line_for_few_shot_datasets():
    prediction = "location\nQuestion: Who wrote it?\nType: person"
    assert score("trec", prediction, ["location"], TREC_CLASSES) == 1.0
    # The same text scored as a whole would also match "person".
    assert classification_score(prediction, "location", TREC_CLASSES) == 0.5


def test_score_routes_by_dataset():
    assert score("gov_report", "a b c d", ["a c b d"]) == pytest.approx(0.75)
    assert score("passage_retrieval_en", "Paragraph 2", ["Paragraph 2"]) == 1.0
    assert score("hotpotqa_e", "paris", ["Paris"]) == 1.0  # LongBench-E name


def test_score_unknown_dataset_names_the_known_ones():
    with pytest.raises(KeyError, match="hotpotqa"):
        score("nosuchset", "x", ["x"])


def test_metrics_are_plain_python():
    source = Path(metrics.__file__).read_text()
    for package in ("nltk", "rouge ", "fuzzywuzzy", "Levenshtein"):
        assert f"import {package}" not in source
