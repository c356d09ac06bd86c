"""`ModuleIndex`: sentence embeddings of a schema's modules, for `Engine.retrieve` and `<prompt retrieve="k">`.

Candidates are the schema's top-level cached modules without parameters and outside unions: modules a
prompt can select on their own, whatever else it selects. Each one's text (its tokens, decoded) is embedded
when the schema is added and kept under the module's own keys: in memory under its module-store key
(`SchemaVersion.key`), on disk, with a `store_dir`, as `<key>.embedding.json` beside `<key>.safetensors`
(the disk store's key of the module's states). A stored embedding of another embedder, or one that fails
its checksum, is computed again; a schema version's embeddings never serve another version.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from ..embeddings import EMBEDDERS, Embedder, EmbeddingError, load_embedder
from ..errors import PromptError
from ..kv.disk import sha256_json, states_key
from ..kv.files import FileStore
from ..markup.layout import ROOT
from ..markup.nodes import Prompt, Selection
from ..markup.rules import MAX_RETRIEVE
from ..normalize import normalize_text
from ..response_match import request_text
from .modules import SchemaVersion

logger = logging.getLogger(__name__)

SUFFIX = ".embedding.json"
# Retrieved modules are seldom a prefix of their schema: their states were encoded after documents the
# prompt skips. SmolLM2-135M, docqa with 3 of 32 documents retrieved (benchmarks/README.md): spliced as
# stored 31.2% accurate against 56.2% for the full prefill, 20% recomputed 50.0%, all stale states 56.2%.
DEFAULT_RETRIEVED_RECOMPUTE = 1.0


@dataclass(frozen=True)
class Retrieved:
    """The modules nearest a question, nearest first, with their cosine similarities."""

    names: tuple[str, ...]
    similarities: tuple[float, ...]


class Embedding:
    """The engine's embedder, loaded once when first needed (`Engine(embedder=)`)."""

    def __init__(self, spec: str | os.PathLike | Embedder):
        if not isinstance(spec, (str, os.PathLike, Embedder)):
            raise EmbeddingError(f"invalid embedder {spec!r:.80}: must be one of {', '.join(EMBEDDERS)}, a "
                                 "checkpoint directory or a promptcache.embeddings.Embedder")
        self.spec = spec
        self._loaded = spec if isinstance(spec, Embedder) else None
        self._lock = threading.Lock()

    def get(self) -> Embedder:
        with self._lock:
            if self._loaded is None:
                self._loaded = _shared_embedder(str(self.spec))
            return self._loaded

    def index(self, modules: ModuleIndex, version: SchemaVersion) -> None:
        """Embed `version`'s retrievable modules now, if there are any and an embedder can be loaded
        (else `retrieve` says why when asked)."""
        if not candidates(version):
            return
        try:
            modules.add(version)
        except EmbeddingError as e:
            logger.info("schema %s: modules not embedded for retrieval: %s", version.name, e)


_SHARED: dict[str, Embedder] = {}
_SHARED_LOCK = threading.Lock()


def _shared_embedder(spec: str) -> Embedder:
    """One loaded embedder per name or directory in a process, shared by every engine (each weighs ~100 MB;
    they only read their weights)."""
    with _SHARED_LOCK:
        if spec not in _SHARED:
            _SHARED[spec] = load_embedder(spec)
        return _SHARED[spec]


def retrieve_modules(modules: ModuleIndex, version: SchemaVersion, question: object, k: object) -> Retrieved:
    """`ModuleIndex.nearest` after checking the caller's `question` and `k` (PromptError naming them)."""
    if not isinstance(question, str) or not question.strip():
        raise PromptError(f"retrieval needs a question: non-empty text, got {question!r:.80}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= MAX_RETRIEVE:
        raise PromptError(f"invalid k={k!r:.80}: must be a whole number of modules from 1 to {MAX_RETRIEVE}")
    return modules.nearest(version, question, int(k))


def with_retrieved(modules: ModuleIndex, version: SchemaVersion, prompt: Prompt) -> tuple[Prompt, tuple[str, ...]]:
    """`prompt` with the modules nearest its question added to its selections (all in schema order), and
    the names of those added (a module the prompt selects already is not added again)."""
    question = request_text(prompt).query
    if not question.strip():
        raise PromptError(f'<prompt schema="{prompt.schema}" retrieve="{prompt.retrieve}"> needs a question: '
                          "end the prompt with a <user> turn or text")
    chosen = retrieve_modules(modules, version, question, prompt.retrieve).names
    selected = {s.name for s in prompt.selections}
    added = [name for name in chosen if name not in selected]
    order = {path: i for i, path in enumerate(version.layout.modules)}
    selections = sorted([*prompt.selections, *(Selection(name) for name in added)],
                        key=lambda s: order.get(s.name, -1))
    return replace(prompt, selections=tuple(selections)), tuple(sorted(added, key=order.__getitem__))


def candidates(version: SchemaVersion) -> list[str]:
    """Module paths retrieval may choose, in schema order: top level, cached, no parameters, no union."""
    cacheable = version.cacheable()
    return [p for p, m in version.layout.modules.items()
            if p != ROOT and "/" not in p and p in cacheable and m.union is None and not m.slots]


class ModuleIndex:
    """Embeddings of retrievable modules per schema version. Thread-safe.

    Args:
        embedder: returns the engine's embedder (loaded on first use).
        tokenizer: decodes a module's tokens into the text that is embedded.
        identity: returns the engine's identity (hashed into disk keys, as the disk store does).
        store_dir: where module states persist, or None.
    """

    def __init__(self, embedder: Callable[[], Embedder], tokenizer, identity: Callable[[], dict],
                 store_dir=None):
        self.embedder, self.tokenizer, self.identity = embedder, tokenizer, identity
        self.files = FileStore(store_dir, SUFFIX, argument="store_dir") if store_dir is not None else None
        self._vectors: dict[str, torch.Tensor] = {}  # module-store key -> [dim]
        self._lock = threading.Lock()

    def add(self, version: SchemaVersion) -> int:
        """Embed (or load) every candidate module of `version`; returns how many were computed."""
        paths = [p for p in candidates(version) if version.key(p) not in self._vectors]
        if not paths:
            return 0
        embedder = self.embedder()
        loaded = {p: v for p in paths if (v := self._load(version, p, embedder.identity)) is not None}
        missing = [p for p in paths if p not in loaded]
        texts = [self.tokenizer.decode(list(version.layout.modules[p].token_ids), skip_special_tokens=True)
                 for p in missing]
        computed = dict(zip(missing, embedder.embed(texts))) if missing else {}
        for path, vector in computed.items():
            self._save(version, path, embedder.identity, vector)
        with self._lock:
            for path, vector in {**loaded, **computed}.items():
                self._vectors[version.key(path)] = vector
        return len(computed)

    def nearest(self, version: SchemaVersion, question: str, k: int) -> Retrieved:
        """The `k` candidate modules of `version` nearest `question` (fewer when it has fewer)."""
        self.add(version)  # a no-op unless the schema was added before an embedder could be loaded
        paths = candidates(version)
        if not paths:
            raise PromptError(f"schema '{version.name}' has no module retrieval can choose (top-level cached "
                              f"modules without parameters, outside unions)")
        with self._lock:
            matrix = torch.stack([self._vectors[version.key(p)] for p in paths])  # matrix: [modules, dim]
        # the cleaned-up question: one that differs only in case, spacing or a final "?" retrieves the same
        # modules, so that its response-cache key (which holds them) can match (response_match)
        sims = matrix @ self.embedder().embed([normalize_text(question)])[0]
        top = torch.argsort(sims, descending=True, stable=True)[:k].tolist()
        return Retrieved(tuple(paths[i] for i in top), tuple(float(sims[i]) for i in top))

    def forget(self, versions: Sequence[SchemaVersion]) -> None:
        """Drop in-memory embeddings of `versions` (a removed or replaced schema)."""
        with self._lock:
            for version in versions:
                for path in version.layout.modules:
                    self._vectors.pop(version.key(path), None)

    # ---- disk ------------------------------------------------------------------------------

    def disk_key(self, version: SchemaVersion, path: str) -> str:
        """The disk store's key of the module's states (`ModuleRegistry`): the embedding's key too."""
        return states_key(**self.identity(), context=version.contexts[path])

    def _load(self, version: SchemaVersion, path: str, embedder: str) -> torch.Tensor | None:
        if self.files is None:
            return None
        key = self.disk_key(version, path)
        f = self.files.open(key)
        if f is None:
            return None
        with f:
            try:
                record = json.loads(f.read().decode("utf-8"))
                digest = record.pop("sha256")
                if digest != sha256_json(record) or record["key"] != key:
                    raise ValueError("checksum or key mismatch")
                if record["embedder"] != embedder:
                    return None  # another embedder's: computed again and replaced
                return torch.tensor(record["vector"], dtype=torch.float32)
            except Exception as e:  # noqa: BLE001 - a bad file is a miss, never a crash
                self.files.discard(key, f, f"corrupt module embedding: {e}")
                return None

    def _save(self, version: SchemaVersion, path: str, embedder: str, vector: torch.Tensor) -> None:
        if self.files is None:
            return
        key = self.disk_key(version, path)
        record = {"key": key, "embedder": embedder, "schema": version.name, "module": path,
                  "vector": vector.tolist()}
        record["sha256"] = sha256_json(record)
        self.files.write(key, json.dumps(record).encode("utf-8"))
