"""Learned scorers on tiny random BERT checkpoints built offline."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizer

from benchmarks.scorers import BleurtScorer, EmbeddingScorer, ScorerError, load_scorer

WORDS = ("the cat sat on mat a dog ran in park quickly slowly red blue house tree "
         "is was big small green bird flew over river").split()
SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "the bird flew over the river",
             "a big red house", "green tree"]


def tiny_checkpoint(directory, num_labels: int | None) -> str:
    """A seeded random 2-layer BERT (+ word-level tokenizer) saved to `directory`."""
    torch.manual_seed(0)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)})
    kwargs = {} if num_labels is None else {"num_labels": num_labels}
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, **kwargs)
    model = BertModel(config) if num_labels is None else BertForSequenceClassification(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def bleurt_dir(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("bleurt"), num_labels=1)


@pytest.fixture(scope="module")
def embedding_dir(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("embedding"), num_labels=None)


def test_regression_head_loads_bleurt_style(bleurt_dir):
    scorer = load_scorer(bleurt_dir, batch_size=2)
    assert isinstance(scorer, BleurtScorer)
    scores = scorer.score(SENTENCES, SENTENCES[::-1])
    assert len(scores) == len(SENTENCES) and all(isinstance(s, float) for s in scores)
    assert len(set(scores)) > 1   # the pair matters, not just a constant


def test_bleurt_scores_the_reference_candidate_pair(bleurt_dir):
    scorer = load_scorer(bleurt_dir)
    reference, candidate = SENTENCES[0], SENTENCES[1]
    batch = scorer.tokenizer([reference], [candidate], return_tensors="pt")
    with torch.no_grad():
        expected = scorer.model(**batch).logits[0, 0].item()
    assert scorer.score([candidate], [reference]) == pytest.approx([expected], abs=1e-5)


def test_batching_does_not_change_scores(bleurt_dir):
    one_batch = load_scorer(bleurt_dir, batch_size=16).score(SENTENCES, SENTENCES[1:] + SENTENCES[:1])
    many = load_scorer(bleurt_dir, batch_size=2).score(SENTENCES, SENTENCES[1:] + SENTENCES[:1])
    assert many == pytest.approx(one_batch, abs=1e-5)


def test_base_model_loads_embedding_scorer(embedding_dir):
    assert isinstance(load_scorer(embedding_dir), EmbeddingScorer)


def test_two_label_classifier_is_not_bleurt_style(tmp_path):
    assert isinstance(load_scorer(tiny_checkpoint(tmp_path, num_labels=2)), EmbeddingScorer)


def test_identical_strings_score_highest(embedding_dir):
    scorer = load_scorer(embedding_dir)
    reference = SENTENCES[0]
    scores = scorer.score(SENTENCES, [reference] * len(SENTENCES))
    assert scores[0] == pytest.approx(1.0, abs=1e-5)
    assert all(-1.0 - 1e-5 <= s <= scores[0] + 1e-6 for s in scores)
    assert max(scores[1:]) < scores[0]


def test_padding_does_not_change_embedding_scores(embedding_dir):
    scorer = load_scorer(embedding_dir)
    alone = scorer.score([SENTENCES[4]], [SENTENCES[3]])
    padded = scorer.score([SENTENCES[4], SENTENCES[0]], [SENTENCES[3], SENTENCES[2]])
    assert padded[0] == pytest.approx(alone[0], abs=1e-5)


def test_empty_and_mismatched_inputs(embedding_dir):
    scorer = load_scorer(embedding_dir)
    assert scorer.score([], []) == []
    with pytest.raises(ScorerError, match="2 predictions but 1 references"):
        scorer.score(["a", "b"], ["a"])


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ScorerError, match="no local scorer checkpoint"):
        load_scorer(tmp_path / "nowhere")
    with pytest.raises(ScorerError, match="config.json"):
        load_scorer(tmp_path)


def test_broken_checkpoint_is_a_scorer_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ScorerError, match="cannot load scorer checkpoint"):
        load_scorer(tmp_path)
