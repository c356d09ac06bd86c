"""A fast, deterministic stand-in for a sentence embedder: hashed bags of words (tests only)."""

from __future__ import annotations

import hashlib
import re

import torch

from promptcache.embeddings import Embedder

DIM = 256


class BagOfWords(Embedder):
    """Texts sharing more words are more similar; word order does not matter. `unknown` words are not read."""

    identity = "test/bag-of-words"

    def __init__(self, unknown: tuple[str, ...] = ()):
        super().__init__()
        self.unknown = set(unknown)
        self.calls = 0

    def covers(self, text: str) -> bool:
        return not self.unknown & set(re.findall(r"\w+", text.lower()))

    def _embed(self, texts: list[str]) -> torch.Tensor:
        self.calls += len(texts)
        out = torch.zeros(len(texts), DIM)
        for row, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                out[row, int(hashlib.sha256(word.encode()).hexdigest(), 16) % DIM] += 1.0
        return out


def similarity(a: str, b: str) -> float:
    v = BagOfWords().embed([a, b])
    return float(v[0] @ v[1])
