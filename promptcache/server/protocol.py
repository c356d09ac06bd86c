"""Request bodies of `/v1/chat/completions` and `/v1/completions`, checked into a `GenerationRequest`.

Every field is checked for type and range here, before any model work, and a bad one is an
`ApiError` (400) naming it and what would be valid. Fields OpenAI defines that this server cannot
honour (n > 1, logprobs, tools, penalties other than `repetition_penalty`, ...) are refused when set
to anything but their neutral value, rather than silently ignored; fields it does not know are
ignored, as OpenAI-compatible servers do. Extensions (vLLM's names): `top_k`,
`repetition_penalty`, `ignore_eos`, and `cache_salt`, the tenant whose cached prefixes a request
may reuse (the engine's `namespace`); promptcache's own: `recompute`, the fraction of a PML prompt's
stale spliced tokens to recompute (0..1; the server's `--recompute` when absent).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ..engine.generate import SamplingParams
from .errors import bad_field

Kind = Literal["chat", "completion"]

MAX_TOKENS_LIMIT = 1 << 31
MAX_STOPS = 16
MAX_SALT_CHARS = 256
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed takes

# fields refused unless they hold their neutral value: name -> (neutral values, hint)
UNSUPPORTED = {
    "logprobs": ((None, False), "log probabilities are not returned"),
    "top_logprobs": ((None, 0), "log probabilities are not returned"),
    "echo": ((None, False), "the prompt is not echoed"),
    "best_of": ((None, 1), "only one completion is generated"),
    "suffix": ((None, ""), "insertion after a suffix is not supported"),
    "tools": ((None, []), "tool calling is not supported"),
    "functions": ((None, []), "function calling is not supported"),
    "frequency_penalty": ((None, 0, 0.0), "use repetition_penalty (> 1 penalises repeats)"),
    "presence_penalty": ((None, 0, 0.0), "use repetition_penalty (> 1 penalises repeats)"),
    "logit_bias": ((None, {}), "logit biases are not supported"),
}


@dataclass(frozen=True)
class GenerationRequest:
    """A checked completion request.

    Attributes:
        kind: "chat" (messages) or "completion" (a prompt: plain text or PML).
        model: the model the client named.
        prompt: chat messages `[{"role", "content"}]` or prompt text.
        params: sampling parameters for the engine.
        stream: answer as server-sent events.
        include_usage: with `stream`, send a final chunk carrying usage.
        namespace: the tenant (`cache_salt`); "" is the shared default.
        recompute: the request's recompute fraction; None: the engine's.
    """

    kind: Kind
    model: str
    prompt: str | list[dict[str, str]]
    params: SamplingParams
    stream: bool
    include_usage: bool
    namespace: str
    recompute: float | None = None


def parse_request(body: Any, kind: Kind, default_max_tokens: int) -> GenerationRequest:
    """Check a decoded JSON body into a `GenerationRequest`; an ApiError (400) names the first bad field."""
    if not isinstance(body, Mapping):
        raise bad_field("body", f"must be a JSON object, got {_json_type(body)}")
    model = _string(body, "model")
    if model is None:
        raise bad_field("model", "is required: a model id from GET /v1/models")
    _refuse_unsupported(body)
    prompt = _messages(body) if kind == "chat" else _prompt(body)
    stream = bool(_boolean(body, "stream"))
    include_usage = _stream_options(body, stream)
    salt = _string(body, "cache_salt", max_chars=MAX_SALT_CHARS)
    recompute = None if body.get("recompute") is None else _number(body, "recompute", 0.0, 1.0, default=0.0)
    return GenerationRequest(kind, model, prompt, _sampling(body, kind, default_max_tokens), stream,
                             include_usage, salt or "", recompute)


def _sampling(body: Mapping, kind: Kind, default_max_tokens: int) -> SamplingParams:
    n = _integer(body, "n", 1)
    if n not in (None, 1):
        raise bad_field("n", f"only n=1 is supported (one completion per request), got {n}")
    max_tokens = _integer(body, "max_tokens", 1, MAX_TOKENS_LIMIT)
    if kind == "chat":
        max_tokens = _integer(body, "max_completion_tokens", 1, MAX_TOKENS_LIMIT) or max_tokens
    top_k = _integer(body, "top_k", -1)
    return SamplingParams(
        max_new_tokens=max_tokens or default_max_tokens,
        temperature=_number(body, "temperature", 0.0, 2.0, default=1.0),
        top_p=_number(body, "top_p", 0.0, 1.0, default=1.0, low_open=True),
        top_k=0 if top_k in (None, -1) else top_k,
        repetition_penalty=_number(body, "repetition_penalty", 0.0, math.inf, default=1.0, low_open=True),
        stop=_stops(body),
        seed=_integer(body, "seed", *SEED_RANGE),
        ignore_eos=bool(_boolean(body, "ignore_eos")),
    )


def _refuse_unsupported(body: Mapping) -> None:
    for name, (neutral, hint) in UNSUPPORTED.items():
        value = body.get(name)
        if not any(value == v and type(value) is type(v) for v in neutral):
            raise bad_field(name, f"{hint}; got {value!r:.60}")


def _messages(body: Mapping) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_field("messages", f"must be a non-empty array of messages, got {_json_type(messages)}")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise bad_field(where, f"must be an object with 'role' and 'content', got {_json_type(m)}")
        role = m.get("role")
        if not isinstance(role, str):
            raise bad_field(f"{where}.role", f"must be a string, got {_json_type(role)}")
        # NOTE: "developer" is OpenAI's newer name for the system role
        out.append({"role": "system" if role == "developer" else role, "content": _content(m, where)})
    return out


def _content(message: Mapping, where: str) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_field(f"{where}.content[{j}]", "only text parts {\"type\": \"text\", \"text\": ...} "
                                f"are supported, got {part!r:.60}")
            texts.append(part["text"])
        return "".join(texts)
    raise bad_field(f"{where}.content", f"must be a string or an array of text parts, got {_json_type(content)}")


def _prompt(body: Mapping) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad_field("prompt", "must be a string (plain text or a PML <prompt> document) or an array of "
                        f"exactly one string, got {_json_type(prompt)}")
    return prompt


def _stops(body: Mapping) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad_field("stop", f"must be a non-empty string or an array of them, got {stop!r:.60}")
    if len(stops) > MAX_STOPS:
        raise bad_field("stop", f"at most {MAX_STOPS} stop strings, got {len(stops)}")
    return tuple(stops)


def _stream_options(body: Mapping, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise bad_field("stream_options", "is only allowed when stream is true")
    if not isinstance(options, Mapping):
        raise bad_field("stream_options", f"must be an object, got {_json_type(options)}")
    return bool(_boolean(options, "include_usage", "stream_options.include_usage"))


# ---- typed fields ---------------------------------------------------------------------------


def _string(body: Mapping, name: str, *, max_chars: int | None = None) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise bad_field(name, f"must be a string, got {_json_type(value)}")
    if value is not None and max_chars is not None and len(value) > max_chars:
        raise bad_field(name, f"at most {max_chars} characters, got {len(value)}")
    return value


def _boolean(body: Mapping, name: str, param: str | None = None) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise bad_field(param or name, f"must be true or false, got {_json_type(value)}")
    return value


def _integer(body: Mapping, name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_field(name, f"must be an integer, got {_json_type(value)}")
    if value < low or (high is not None and value > high):
        valid = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise bad_field(name, f"must be {valid}, got {value}")
    return value


def _number(body: Mapping, name: str, low: float, high: float, *, default: float,
            low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_field(name, f"must be a finite number, got {_json_type(value)}")
    if value < low or value > high or (low_open and value == low):
        valid = f"{'(' if low_open else '['}{low:g}, {high:g}]" if high != math.inf else f"> {low:g}"
        raise bad_field(name, f"must be in {valid}, got {value}")
    return float(value)


def _json_type(value: Any) -> str:
    """How JSON would name `value`'s type (what the client sent)."""
    for kind, name in ((bool, "a boolean"), (str, "a string"), (int, "an integer"), (float, "a number"),
                       (list, "an array"), (Mapping, "an object")):
        if isinstance(value, kind):
            return name
    return "null" if value is None else type(value).__name__
