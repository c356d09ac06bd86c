"""Result objects: `Usage` (counted like the cloud APIs), `Completion`, and streamed `Chunk`s.

Usage semantics:
- input_tokens: every prompt token, cached ones included.
- cached_tokens: prompt tokens whose states were read from a cache (modules or prefixes).
- cache_write_tokens: prompt tokens whose states this request computed and stored for reuse.
- output_tokens: generated tokens (an EOS or stop token that ended generation is not counted).
- ttft_s: request start to the first generated token; total_s: request start to the end.
- modules_hit: for PML prompts, the modules whose stored states were spliced;
  modules_written: those (re-)encoded by this request (evicted or never encoded).
- response_cached: the whole completion came from the response cache (nothing was computed).
- response_similarity: with `response_cached`, how close the cached request was: 1.0 for a key match,
  the cosine similarity of the query texts for a semantic one (`response_match`); None otherwise.
- modules_retrieved: for PML prompts with `retrieve="k"`, the modules retrieval chose (in schema order).
- recomputed_tokens: for PML prompts, spliced tokens whose states were stale (their module was
  encoded in another context than the prompt's) and were recomputed (`Engine(recompute=)`); they
  are not among cached_tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Usage:
    input_tokens: int
    cached_tokens: int
    cache_write_tokens: int
    output_tokens: int
    ttft_s: float
    total_s: float
    modules_hit: tuple[str, ...] = ()
    modules_written: tuple[str, ...] = ()
    response_cached: bool = False
    recomputed_tokens: int = 0
    response_similarity: float | None = None
    modules_retrieved: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]
    usage: Usage
    finish_reason: str  # "stop" (EOS, stop string or stop token) or "length"
    stop_sequence: str | None = None  # the stop string that ended it (a request's or the chat format's)


@dataclass(frozen=True)
class Chunk:
    """A streamed text delta; the last chunk carries `usage` and `finish_reason`."""

    text: str
    usage: Usage | None = None
    finish_reason: str | None = None
    stop_sequence: str | None = None
