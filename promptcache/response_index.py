"""`SemanticIndex`: the embedded request texts of cached responses, for `response_match="semantic"`.

An entry is (group, key, vector): `group` hashes everything in a request's key but its query text (model
identity, schema version and modules, sampling parameters, namespace, earlier turns), `key` is the
response-cache key of its answer, `vector` the unit embedding of its normalised query text. `nearest`
only compares entries of the same group, so a semantic match never crosses a model, a module set, a
sampling setting or a tenant.

Persistence: one safetensors file, `<response_cache_dir>/semantic-index.safetensors` (vectors as one
[entries, dim] float32 tensor; entries, the embedder's identity and a sha256 over both in the metadata),
written atomically after each change. A file of another embedder, version or checksum is ignored (and
replaced on the next write): the index only ever points at answers, which are checked again on use.

Growth is bounded by `max_entries`. Eviction order: when an entry is added to a full index, the entry
used least recently goes first (an entry is used when added and when it answers a request); among equally
recent ones, the oldest added. Removing an entry never removes its answer from the response cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from .errors import StoreError
from .kv.disk import sha256_json
from .kv.files import atomic_write

logger = logging.getLogger(__name__)

FILE_NAME = "semantic-index.safetensors"
VERSION = "1"
DEFAULT_MAX_ENTRIES = 2048  # 2048 x 512 float32 = 4 MiB of vectors


@dataclass
class Entry:
    group: str
    key: str
    used: int  # the index's use counter when last added or matched (a logical clock, not wall time)


@dataclass(frozen=True)
class Nearest:
    key: str
    similarity: float


class SemanticIndex:
    """Unit vectors of cached requests' query texts, by group. Thread-safe.

    Args:
        root: the response cache's directory (the index file goes there).
        embedder_identity: the embedder whose vectors these are; a file of another one is ignored.
        max_entries: the bound on entries (least recently used evicted first).

    Raises:
        StoreError: a bad `max_entries`.
    """

    def __init__(self, root: str | os.PathLike, embedder_identity: str, max_entries: int = DEFAULT_MAX_ENTRIES):
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise StoreError(f"invalid max_entries={max_entries!r:.80}: must be an int >= 1")
        self.path = Path(root) / FILE_NAME
        self.identity, self.max_entries = embedder_identity, max_entries
        self.entries: list[Entry] = []
        self.vectors = torch.zeros(0, 0)  # vectors: [entries, dim]
        self._clock = 0
        self._lock = threading.Lock()
        self._load()

    def __len__(self) -> int:
        return len(self.entries)

    def nearest(self, group: str, vector: torch.Tensor, threshold: float) -> list[Nearest]:
        """Entries of `group` at least `threshold` similar to the unit `vector` (cosine), most similar first.

        Each one returned counts as used (see the eviction order)."""
        with self._lock:
            rows = [i for i, e in enumerate(self.entries) if e.group == group]
            if not rows or self.vectors.shape[1] != vector.shape[-1]:
                return []
            sims = (self.vectors[rows] @ vector.float()).tolist()
            found = sorted(((s, i) for s, i in zip(sims, rows) if s >= threshold), reverse=True)
            for _, i in found:
                self._clock += 1
                self.entries[i].used = self._clock
            return [Nearest(self.entries[i].key, s) for s, i in found]

    def add(self, group: str, key: str, vector: torch.Tensor) -> None:
        """Index `key` (an answer's response-cache key) under `group`; evicts when full; persists."""
        with self._lock:
            self._drop(lambda e: e.key == key)
            vector = vector.float().reshape(1, -1)
            if len(self.entries) and self.vectors.shape[1] != vector.shape[1]:
                self.entries, self.vectors = [], torch.zeros(0, 0)  # another embedder's vectors
            while len(self.entries) >= self.max_entries:
                self._evict_one()
            self._clock += 1
            self.entries.append(Entry(group, key, self._clock))
            self.vectors = vector if not len(self.vectors) else torch.cat([self.vectors, vector])
            self._save()

    def remove(self, key: str) -> None:
        """Forget the entry of `key` (its answer was evicted, expired or bad)."""
        with self._lock:
            if self._drop(lambda e: e.key == key):
                self._save()

    def keys(self) -> list[str]:
        """Indexed keys, least recently used first (the eviction order)."""
        with self._lock:
            return [e.key for e in sorted(self.entries, key=lambda e: e.used)]

    def _evict_one(self) -> None:
        victim = min(self.entries, key=lambda e: e.used)  # min() keeps the first (oldest) of equals
        self._drop(lambda e: e is victim)

    def _drop(self, which) -> bool:
        keep = [i for i, e in enumerate(self.entries) if not which(e)]
        if len(keep) == len(self.entries):
            return False
        self.entries = [self.entries[i] for i in keep]
        self.vectors = self.vectors[keep] if keep else torch.zeros(0, 0)
        return True

    # ---- persistence -----------------------------------------------------------------------

    def _meta(self) -> dict:
        return {"version": VERSION, "embedder": self.identity,
                "entries": [[e.group, e.key, e.used] for e in self.entries]}

    def _save(self) -> None:
        meta = self._meta()
        vectors = self.vectors.contiguous()
        meta["sha256"] = _digest(meta, vectors)
        try:
            data = safetensors_save({"vectors": vectors}, metadata={"index": json.dumps(meta)})
            atomic_write(self.path, data)
        except OSError as e:
            logger.warning("could not write the semantic index %s: %s", self.path, e)

    def _load(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as e:
            logger.warning("ignoring the semantic index %s: %s", self.path, e)
            return
        try:
            entries, vectors, clock = _unpack(data, self.identity)
        except Exception as e:  # noqa: BLE001 - a bad index is an empty one, never a crash
            logger.warning("ignoring the semantic index %s: %s", self.path, e)
            return
        self.entries, self.vectors, self._clock = entries, vectors, clock
        while len(self.entries) > self.max_entries:  # a smaller bound than the file was written with
            self._evict_one()


def _unpack(data: bytes, identity: str) -> tuple[list[Entry], torch.Tensor, int]:
    meta = json.loads(_metadata(data)["index"])
    vectors = safetensors_load(data)["vectors"].float()
    digest = meta.pop("sha256", None)
    if meta.get("version") != VERSION or meta.get("embedder") != identity:
        raise StoreError("written by another version or embedder")
    if digest != _digest(meta, vectors):
        raise StoreError("checksum mismatch")
    entries = [Entry(str(g), str(k), int(u)) for g, k, u in meta["entries"]]
    if len(entries) != len(vectors) or (len(entries) and vectors.dim() != 2):
        raise StoreError("entries and vectors disagree")
    return entries, vectors, max((e.used for e in entries), default=0)


def _digest(meta: dict, vectors: torch.Tensor) -> str:
    """sha256 over the metadata's canonical JSON and the vectors' bytes (float32, row-major)."""
    h = hashlib.sha256(sha256_json(meta).encode())
    h.update(str(tuple(vectors.shape)).encode())
    h.update(vectors.float().contiguous().numpy().tobytes())
    return h.hexdigest()


def _metadata(data: bytes) -> dict:
    """The `__metadata__` of a safetensors buffer."""
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise StoreError("truncated")
    return json.loads(data[8:8 + n]).get("__metadata__") or {}
