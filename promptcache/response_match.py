"""How a request finds a cached response: `Engine(response_match="exact" | "normalized" | "semantic")`.

- "exact" (the default): the key holds the exact token ids and positions fed (`Engine._response_key`).
- "normalized": the key holds the request's text after `normalize.normalize_text` instead (NFKC, case,
  whitespace, trailing punctuation); everything else in the key is unchanged.
- "semantic": as "normalized", and when that misses, the request's query text (a plain prompt, a chat's
  last user turn, a PML prompt's last user turn or text) is embedded and compared with the cached requests
  of its group: everything else in the key (model identity, schema version and modules, sampling
  parameters, namespace, earlier turns, PML selections and arguments) equal. The nearest one answers when
  its cosine similarity is at least `semantic_threshold` and `normalize.guards_agree` (numbers, names,
  negation, units). `usage.response_similarity` says how close it was (1.0 for a key match).

What a wrong reuse costs: the answer to another question, served as this one's, with nothing to tell the
caller but `usage.response_cached` and `usage.response_similarity`. The default threshold is the lowest
with no wrong reuse on the shipped labelled set (`benchmarks/semantic.py`), and it answers only about a
quarter of its paraphrases: precision first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .embeddings import MINILM_IDENTITY, USE_MULTILINGUAL, Embedder, UseEmbedder, load_embedder
from .errors import PromptError
from .kv.disk import states_key
from .markup.nodes import Prompt, RoleBlock, Selection, Text
from .markup.parse import is_pml, parse_prompt
from .normalize import guards_agree, normalize_text
from .response_cache import ResponseCache
from .response_index import DEFAULT_MAX_ENTRIES, SemanticIndex

logger = logging.getLogger(__name__)

MATCHES = ("exact", "normalized", "semantic")
# benchmarks/results/semantic-reuse.json: the lowest threshold with no false reuse, guards on, en + ko;
# by embedder identity (`Embedder.identity`)
DEFAULT_THRESHOLDS = {UseEmbedder.identity: 0.90, MINILM_IDENTITY: 0.83}
OTHER_THRESHOLD = 0.95  # an embedder the labelled set has not measured
DEFAULT_EMBEDDER = USE_MULTILINGUAL


@dataclass(frozen=True)
class RequestText:
    """A request's text: `query` (matched by meaning) and `context` (the rest, matched after clean-up)."""

    query: str
    context: tuple


@dataclass(frozen=True)
class ResponseKey:
    """Where a request's answer is cached: `key`, and for semantic matching its `group` and `query`."""

    key: str
    group: str | None = None
    query: str = ""


@dataclass(frozen=True)
class Reused:
    payload: dict
    similarity: float


def check_match(match: object, cache_dir: object) -> str:
    """`response_match`, checked: one of MATCHES, and other than "exact" only with a response cache."""
    if match not in MATCHES:
        raise PromptError(f"invalid response_match={match!r:.80}: must be one of {', '.join(MATCHES)}")
    if match != "exact" and cache_dir is None:
        raise PromptError(f'response_match="{match}" needs a response cache: pass response_cache_dir=PATH too')
    return match


def request_text(prompt) -> RequestText:
    """The query and context of a plain prompt, a chat (`[{"role", "content"}]`) or a PML prompt."""
    if isinstance(prompt, str) and not is_pml(prompt):
        return RequestText(prompt, ())
    if isinstance(prompt, str):
        prompt = parse_prompt(prompt)
    if isinstance(prompt, Prompt):
        tail = [(b.role, _text(b.children)) if isinstance(b, RoleBlock) else ("", b.text) for b in prompt.tail]
        query = tail.pop()[1] if tail and tail[-1][0] in ("user", "") else ""
        return RequestText(query, (prompt.schema, _selections(prompt.selections),
                                   tuple((r, normalize_text(t)) for r, t in tail)))
    messages = [(str(m["role"]), str(m["content"])) for m in prompt]
    query = messages.pop()[1] if messages and messages[-1][0] == "user" else ""
    return RequestText(query, tuple((r, normalize_text(t)) for r, t in messages))


def _text(nodes) -> str:
    return " ".join(n.text if isinstance(n, Text) else _text(getattr(n, "children", ())) for n in nodes)


def _selections(sels: tuple[Selection, ...]) -> tuple:
    return tuple((s.name, tuple((k, normalize_text(v)) for k, v in s.args), _selections(s.children))
                 for s in sels)


class ResponseReuse:
    """Keys, lookups and writes of the response cache under one `response_match` mode.

    Args:
        cache: the response cache.
        match: "exact", "normalized" or "semantic".
        threshold: the least cosine similarity of a semantic match (None: the embedder's default).
        embedder: an embedder name (`embeddings.EMBEDDERS`), a checkpoint directory, or an `Embedder`
            (loaded only for "semantic").
        max_entries: the semantic index's bound.

    Raises:
        PromptError: a bad `match` or `threshold`; EmbeddingError: the embedder cannot be loaded.
    """

    def __init__(self, cache: ResponseCache, match: str = "exact", threshold: float | None = None,
                 embedder: str | Embedder = DEFAULT_EMBEDDER, max_entries: int = DEFAULT_MAX_ENTRIES):
        if match not in MATCHES:
            raise PromptError(f"invalid response_match={match!r:.80}: must be one of {', '.join(MATCHES)}")
        self.cache, self.match = cache, match
        self.embedder = self.index = None
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                      or not 0 < threshold <= 1):
            raise PromptError(f"invalid semantic_threshold={threshold!r:.80}: must be a number in (0, 1]")
        self.threshold = None if threshold is None else float(threshold)
        if match == "semantic":
            self.embedder = embedder if isinstance(embedder, Embedder) else load_embedder(embedder)
            self.index = SemanticIndex(cache.root, self.embedder.identity, max_entries)
            if self.threshold is None:
                self.threshold = DEFAULT_THRESHOLDS.get(self.embedder.identity, OTHER_THRESHOLD)

    def key(self, common: dict, exact: dict, prompt) -> ResponseKey:
        """The response key of a request: `common` parts (everything but the text), and either the `exact`
        token parts or the request's normalised text."""
        if self.match == "exact":
            return ResponseKey(states_key(**common, **exact))
        text = request_text(prompt)
        query = normalize_text(text.query)
        key = states_key(**common, match="normalized", context=text.context, query=query)
        if self.match == "normalized" or not query:
            return ResponseKey(key)
        return ResponseKey(key, states_key(**common, match="group", context=text.context), text.query)

    def lookup(self, rk: ResponseKey) -> Reused | None:
        """The cached answer of `rk`, else (semantic) of the nearest request of its group, else None."""
        hit = self.cache.get(rk.key)
        if hit is not None:
            return Reused(hit, 1.0)
        if rk.group is None or not self.embedder.covers(rk.query):
            return None
        for near in self.index.nearest(rk.group, self._vector(rk.query), self.threshold):
            hit = self.cache.get(near.key)
            if hit is None or hit.get("group") != rk.group:  # evicted, expired, or not this group's answer
                self.index.remove(near.key)
            elif guards_agree(str(hit.get("query", "")), rk.query):
                return Reused(hit, near.similarity)
        return None

    def remember(self, rk: ResponseKey, payload: dict) -> None:
        """Cache `payload` under `rk` (and index its query for semantic matches)."""
        if rk.group is not None:
            payload = {**payload, "group": rk.group, "query": rk.query}
        if self.cache.put(rk.key, payload) and rk.group is not None and self.embedder.covers(rk.query):
            self.index.add(rk.group, rk.key, self._vector(rk.query))

    def _vector(self, query: str):
        return self.embedder.embed([normalize_text(query)])[0]
