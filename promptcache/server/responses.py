"""Response bodies in OpenAI's shapes: completions, streamed chunks, usage, models and schemas.

`kept_tokens`: prompt tokens this request's `cache_control` breakpoints newly kept (see engine.keep).

Usage always carries OpenAI's counts plus a `promptcache` object:

    "usage": {"prompt_tokens": 812, "completion_tokens": 40, "total_tokens": 852,
              "prompt_tokens_details": {"cached_tokens": 790},
              "promptcache": {"cache_write_tokens": 22, "kept_tokens": 0, "recomputed_tokens": 0,
                              "modules_hit": ["docs"], "modules_written": [],
                              "ttft_s": 0.061, "total_s": 0.93, "response_cached": false}}
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from ..engine.keep import CacheReport
from ..engine.usage import Usage
from ..markup.layout import SchemaLayout
from .protocol import Kind


def usage_body(usage: Usage, cache: CacheReport | None = None) -> dict:
    """OpenAI's usage object, with cache reads in `prompt_tokens_details` and the rest under `promptcache`."""
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "promptcache": {
            "cache_write_tokens": usage.cache_write_tokens,
            "kept_tokens": cache.write_tokens if cache is not None else 0,
            "recomputed_tokens": usage.recomputed_tokens,
            "modules_hit": list(usage.modules_hit),
            "modules_written": list(usage.modules_written),
            "ttft_s": round(usage.ttft_s, 6),
            "total_s": round(usage.total_s, 6),
            "response_cached": usage.response_cached,
            "response_similarity": usage.response_similarity,
            "modules_retrieved": list(usage.modules_retrieved),
        },
    }


@dataclass
class ResponseShape:
    """One request's id, model and timestamp, and how its completions and chunks look.

    Chat: `chat.completion` with `message`, chunks `chat.completion.chunk` with `delta`.
    Completions: `text_completion` with `text`, chunks of the same object type.
    """

    kind: Kind
    model: str
    id: str = field(default="")
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        if not self.id:
            self.id = ("chatcmpl-" if self.kind == "chat" else "cmpl-") + uuid.uuid4().hex

    def _envelope(self, obj: str, choices: list) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}

    def completion(self, text: str, finish_reason: str, usage: Usage, cache: CacheReport | None = None) -> dict:
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                      "logprobs": None, "finish_reason": finish_reason}
            body = self._envelope("chat.completion", [choice])
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            body = self._envelope("text_completion", [choice])
        body["usage"] = usage_body(usage, cache)
        return body

    def chunk(self, text: str | None, finish_reason: str | None = None, *, role: bool = False,
              include_usage: bool = False) -> dict:
        """A streamed chunk: `text` (None: an empty delta), the role on the first, finish_reason on the last."""
        if self.kind == "chat":
            delta = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            body = self._envelope("chat.completion.chunk", [choice])
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            body = self._envelope("text_completion", [choice])
        if include_usage:
            body["usage"] = None  # OpenAI: null on every chunk but the last, which carries it
        return body

    def usage_chunk(self, usage: Usage, cache: CacheReport | None = None) -> dict:
        """The last chunk of a stream with `stream_options.include_usage`: no choices, the usage."""
        body = self._envelope("chat.completion.chunk" if self.kind == "chat" else "text_completion", [])
        body["usage"] = usage_body(usage, cache)
        return body


def model_body(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "promptcache"}


def schema_body(layout: SchemaLayout) -> dict:
    """A schema's modules in position order: name ("" is the schema's root), positions, token count."""
    modules = sorted(layout.modules.items(), key=lambda kv: (kv[1].start, kv[0].count("/")))
    return {
        "object": "schema",
        "id": layout.name,
        "positions": layout.length,
        "chat_format": layout.chat.name,
        "modules": [{"name": path, "start": m.start, "end": m.end, "tokens": len(m.token_ids), "cache": m.cache,
                     "parameters": sorted(m.slots)} for path, m in modules],
    }
