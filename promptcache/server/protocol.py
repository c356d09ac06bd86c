"""OpenAI's request bodies (`/v1/chat/completions`, `/v1/completions`) as pydantic models, and the one
internal request every API maps to, `GenerationRequest`.

Types and ranges are the models' (strict: "5" is not a number, true is not an integer); a bad field
is a 400 naming it (`jsonbody.validation_error`). What pydantic cannot say is checked in `to_request`:
fields OpenAI defines that this server cannot honour (n > 1, logprobs, tools, penalties other than
`repetition_penalty`, ...) are refused when set to anything but their neutral value, rather than
silently ignored; fields it does not know are ignored, as OpenAI-compatible servers do. Extensions
(vLLM's names): `top_k`, `repetition_penalty`, `ignore_eos`, and `cache_salt`, the tenant whose cached
prefixes a request may reuse (the engine's `namespace`); promptcache's own: `recompute`, the fraction
of a PML prompt's stale spliced tokens to recompute (0..1; the server's `--recompute` when absent).
Text parts may carry Anthropic's `cache_control` (LiteLLM and OpenRouter send it there): a breakpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..engine.generate import SamplingParams
from ..engine.keep import TTL_SECONDS, Breakpoint
from .errors import bad_field

Kind = Literal["chat", "completion"]

MAX_TOKENS_LIMIT = 1 << 31
MAX_STOPS = 16
MAX_SALT_CHARS = 256
MAX_BREAKPOINTS = 4  # Anthropic's limit
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

NonEmpty = Annotated[str, Field(min_length=1)]


class Body(BaseModel):
    """Strict types; unknown fields kept aside (`model_extra`) and ignored."""

    model_config = ConfigDict(strict=True, extra="allow")


class CacheControl(Body):
    """Anthropic's breakpoint: the states of the prompt up to here are kept for `ttl`."""

    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] = "5m"


class TextPart(Body):
    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None


class ChatMessage(Body):
    role: str
    content: str | list[TextPart]


class StreamOptions(Body):
    include_usage: bool | None = None


class Sampling(Body):
    model: str
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    repetition_penalty: float | None = Field(None, gt=0.0)
    stop: NonEmpty | Annotated[list[NonEmpty], Field(max_length=MAX_STOPS)] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    ignore_eos: bool | None = None
    n: int | None = Field(None, ge=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    cache_salt: str | None = Field(None, max_length=MAX_SALT_CHARS)
    recompute: float | None = Field(None, ge=0.0, le=1.0)


class ChatBody(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    cache_control: CacheControl | None = None  # Anthropic's automatic form: a breakpoint at the last part


class CompletionBody(Sampling):
    prompt: str | list[str]


@dataclass(frozen=True)
class GenerationRequest:
    """A checked request, whatever API it came through.

    Attributes:
        kind: "chat" (messages) or "completion" (a prompt: plain text or PML).
        model: the model the client named.
        prompt: chat messages `[{"role", "content"}]` or prompt text.
        params: sampling parameters for the engine.
        stream: answer as a stream of events.
        include_usage: with `stream`, send a final chunk carrying usage (OpenAI).
        namespace: the tenant (`cache_salt`); "" is the shared default.
        recompute: the request's recompute fraction; None: the engine's.
        breakpoints: where the chat's states are to be kept, and for how long (`cache_control`).
    """

    kind: Kind
    model: str
    prompt: str | list[dict[str, str]]
    params: SamplingParams
    stream: bool
    include_usage: bool
    namespace: str
    recompute: float | None = None
    breakpoints: tuple[Breakpoint, ...] = ()


def to_request(body: ChatBody | CompletionBody, default_max_tokens: int) -> GenerationRequest:
    """The internal request of a validated OpenAI body; an ApiError (400) for what the models cannot say."""
    _refuse_unsupported(body.model_extra or {})
    if body.n not in (None, 1):
        raise bad_field("n", f"only n=1 is supported (one completion per request), got {body.n}")
    if body.stream_options is not None and not body.stream:
        raise bad_field("stream_options", "is only allowed when stream is true")
    max_tokens = body.max_tokens
    if isinstance(body, ChatBody):
        prompt, breakpoints = chat_messages(body)
        kind: Kind = "chat"
        max_tokens = body.max_completion_tokens or max_tokens
    else:
        if not isinstance(body.prompt, str) and len(body.prompt) != 1:
            raise bad_field("prompt", "must be a string (plain text or a PML <prompt> document) or an array of "
                            f"exactly one string, got an array of {len(body.prompt)}")
        prompt, breakpoints, kind = body.prompt if isinstance(body.prompt, str) else body.prompt[0], (), "completion"
    params = sampling_params(body, max_tokens or default_max_tokens, temperature=1.0)
    include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
    return GenerationRequest(kind, body.model, prompt, params, bool(body.stream), include_usage,
                             body.cache_salt or "", body.recompute, breakpoints)


def sampling_params(body: Sampling, max_tokens: int, *, temperature: float) -> SamplingParams:
    """The engine's parameters; `temperature` is the API's default (OpenAI's and Anthropic's: 1)."""
    stop = body.stop if body.stop is not None else ()
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=temperature if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0 if body.top_k in (None, -1) else body.top_k,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        stop=(stop,) if isinstance(stop, str) else tuple(stop),
        seed=body.seed,
        ignore_eos=bool(body.ignore_eos),
    )


def chat_messages(body: ChatBody) -> tuple[list[dict[str, str]], tuple[Breakpoint, ...]]:
    """Messages with their text parts joined, and a breakpoint after each part with `cache_control`."""
    messages, breakpoints = [], []
    for i, m in enumerate(body.messages):
        # NOTE: "developer" is OpenAI's newer name for the system role
        role = "system" if m.role == "developer" else m.role
        if isinstance(m.content, str):
            messages.append({"role": role, "content": m.content})
            continue
        text = ""
        for part in m.content:
            text += part.text
            if part.cache_control is not None:
                breakpoints.append(Breakpoint(i, len(text), TTL_SECONDS[part.cache_control.ttl]))
        messages.append({"role": role, "content": text})
    if body.cache_control is not None:  # automatic: after the whole conversation
        breakpoints.append(Breakpoint(len(messages) - 1, len(messages[-1]["content"]),
                                      TTL_SECONDS[body.cache_control.ttl]))
    check_breakpoints(breakpoints, "cache_control")
    return messages, tuple(breakpoints)


def check_breakpoints(breakpoints: list[Breakpoint], param: str) -> None:
    if len(breakpoints) > MAX_BREAKPOINTS:
        raise bad_field(param, f"at most {MAX_BREAKPOINTS} cache breakpoints per request, got {len(breakpoints)}")


def _refuse_unsupported(extra: dict[str, Any]) -> None:
    for name, (neutral, hint) in UNSUPPORTED.items():
        value = extra.get(name)
        if not any(value == v and type(value) is type(v) for v in neutral):
            raise bad_field(name, f"{hint}; got {value!r:.60}")
