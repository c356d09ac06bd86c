"""Sampling parameters, token picking, stop strings and streamable text (the `Decoder` uses them).

Sampling maths comes from transformers' logits processors; each request has its own
`torch.Generator`, so a seed reproduces a sample regardless of other threads.
"""

from __future__ import annotations

import logging
import math
import numbers
import re
from dataclasses import dataclass, fields, replace

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ..errors import PromptError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; top_k 0 and top_p 1 disable those filters.

    temperature (other than 0) and repetition_penalty must lie in `SCALE_RANGE`, 0.01 to 100: the
    logits are divided or multiplied by them in float32, and 1e-300 made them infinite (NaN
    probabilities). A PromptError names the parameter otherwise.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        # NOTE: numpy scalars are numbers.Integral / numbers.Real; they become Python numbers here, so
        # cache keys and torch calls see one type. bool is refused where a number is meant.
        for name, value in _checked(self).items():
            object.__setattr__(self, name, value)

    @classmethod
    def merge(cls, base: SamplingParams | None = None, **overrides) -> SamplingParams:
        """`base` (default: all defaults) with keyword `overrides`; unknown names are a PromptError."""
        if base is not None and not isinstance(base, SamplingParams):
            raise PromptError(f"sampling must be a SamplingParams, got {type(base).__name__}")
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise PromptError(f"unknown generation argument(s) {unknown}; valid: "
                              f"{', '.join(f.name for f in fields(cls))}")
        for name in ("stop", "stop_token_ids"):
            if name in overrides and overrides[name] is None:
                overrides[name] = ()
        return replace(base or cls(), **overrides)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def deterministic(self) -> bool:
        """Whether the same prompt always gets the same tokens (a response cache may serve it)."""
        return self.greedy or self.seed is not None or self.top_k == 1

    def key(self) -> dict:
        """Every field, JSON-ready (for cache keys)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    def processors(self) -> LogitsProcessorList:
        procs = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if not self.greedy:
            if self.temperature != 1.0:
                procs.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k > 0:
                procs.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                procs.append(TopPLogitsWarper(self.top_p))
        return procs


class TokenPicker:
    """Chooses the next token from logits under `params`, with its own RNG."""

    def __init__(self, params: SamplingParams, device: torch.device):
        self.params, self.procs = params, params.processors()
        self.gen = None
        if not params.greedy:
            self.gen = torch.Generator(device=device)
            if params.seed is not None:
                self.gen.manual_seed(params.seed)
            else:  # NOTE: not torch.seed(), which would reseed the caller's global RNG
                self.gen.seed()

    def __call__(self, logits: torch.Tensor, history: torch.Tensor) -> int:
        """logits [vocab] (float), history [1, n] every token so far (for the repetition penalty)."""
        scores = self.procs(history, logits[None].float())
        if self.params.greedy:
            return int(scores.argmax(-1))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.gen))


SEED_RANGE = (0, 2**64 - 1)  # what torch.Generator.manual_seed takes
SCALE_RANGE = (0.01, 100.0)  # temperature (but 0) and repetition_penalty: float32 logits stay finite


def _bad(name: str, value: object, valid: str) -> PromptError:
    return PromptError(f"invalid {name}={value!r:.80}: must be {valid}")


def _int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low or \
            (high is not None and value > high):
        raise _bad(name, value, f"an int >= {low}" + (f" and <= {high}" if high is not None else ""))
    return int(value)


def _real(name: str, value: object, ok, valid: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or not ok(value):
        raise _bad(name, value, f"a finite number {valid}")
    return float(value)


def _scale(value: float) -> bool:
    return SCALE_RANGE[0] <= value <= SCALE_RANGE[1]


def _strings(name: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) and s for s in value):
        raise _bad(name, value, "a non-empty string or a list of non-empty strings")
    return tuple(value)


def _checked(p: SamplingParams) -> dict[str, object]:
    """Every field validated and normalised (Python types, tuples), or a PromptError naming it."""
    ids = p.stop_token_ids
    if not isinstance(ids, (list, tuple)):
        raise _bad("stop_token_ids", ids, "a list of token ids (ints >= 0)")
    if not isinstance(p.ignore_eos, bool):
        raise _bad("ignore_eos", p.ignore_eos, "True or False")
    return {
        "max_new_tokens": _int("max_new_tokens", p.max_new_tokens, 1),
        "temperature": _real("temperature", p.temperature, lambda v: v == 0 or _scale(v),
                             f"0 (greedy) or from {SCALE_RANGE[0]} to {SCALE_RANGE[1]}"),
        "top_p": _real("top_p", p.top_p, lambda v: 0 < v <= 1, "in (0, 1]"),
        "top_k": _int("top_k", p.top_k, 0),
        "repetition_penalty": _real("repetition_penalty", p.repetition_penalty, _scale,
                                    f"from {SCALE_RANGE[0]} to {SCALE_RANGE[1]} (1 is no penalty)"),
        "stop": _strings("stop", p.stop),
        "stop_token_ids": tuple(_int("stop_token_ids", t, 0) for t in ids),
        "seed": None if p.seed is None else _int("seed", p.seed, *SEED_RANGE),
    }


_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class TextTracker:
    """Turns generated ids into text, finds stop strings, and says what is safe to stream.

    Held back: text that could still become a stop string, an unfinished UTF-8 character, and the
    text of a trailing run of byte-fallback tokens ("<0x74>"): SentencePiece decodes a run of bytes
    together, so "t" from <0x74> turns into "\ufffd\ufffd" when an invalid <0xF0> follows.

    Incremental: a decode joins pieces with rules that only look a few tokens back (a merged run of
    byte tokens, a leading space stripped or kept, spaces cleaned up around punctuation). So each
    `add` decodes a window, not every id again: the ids from `_ctx` on, where `_ctx` is `CONTEXT`
    tokens (and any byte run) before the *seam*; the text of the ids before the seam is final. The
    seam follows the end every `WINDOW` tokens, once a decode of the new window agrees with the
    text so far. A window whose decode disagrees with the text before it falls back to one full
    decode; `finish` compares the text with a full decode once, at the end.
    """

    CONTEXT = 4   # ids decoded before the seam, so the joining rules see what precedes it
    WINDOW = 32   # ids past the seam before it moves up

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tok, self.stop = tokenizer, stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.text, self.emitted, self.stopped = "", 0, False
        self.stop_string: str | None = None  # the stop string that ended the text, once `stopped`
        self.run_start = 0  # where the trailing run of byte tokens starts (len(ids) when there is none)
        self._byte: list[bool] = []
        self._seam = self._seam_chars = self._ctx = 0  # text[:_seam_chars] is the final text of ids[:_seam]
        self._ctx_text = ""  # the decode of ids[_ctx:_seam]

    def add(self, token_id: int) -> None:
        self.ids.append(token_id)
        self._byte.append(bool(_BYTE_PIECE.fullmatch(str(self.tok.convert_ids_to_tokens(token_id)))))
        if not self._byte[-1]:
            self.run_start = len(self.ids)
        window = self._decode(self._ctx)
        if window.startswith(self._ctx_text):
            self.text = self.text[: self._seam_chars] + window[len(self._ctx_text):]
        else:  # the joining rules reached past the context: start over from a full decode
            self._seam = self._seam_chars = self._ctx = 0
            self._ctx_text, self.text = "", self._decode(0)
        self._find_stop(max(0, max(self.emitted, self._seam_chars) - self.hold))
        if not self.stopped and len(self.ids) - self._seam >= self.WINDOW:
            self._move_seam()

    def finish(self) -> None:
        """Check the text against one full decode of every id (kept, with a warning, if they differ)."""
        full = self._decode(0)
        if full.startswith(self.text) if self.stopped else full == self.text:
            return
        logger.warning("incremental detokenization disagreed with a full decode; using the full decode")
        self.text, self.stopped, self.stop_string = full, False, None
        self._find_stop(0)

    def delta(self, final: bool) -> str:
        end = len(self.text)
        if not final:
            # NOTE: unfinished characters first, then the hold: a stop string may begin with characters
            # still arriving byte by byte, so it is held back from the last *finished* character
            if self.run_start < len(self.ids):
                end = min(end, self._length_before(self.run_start))
            while end > self.emitted and self.text[end - 1] == "\ufffd":
                end -= 1
            end -= self.hold
        if end <= self.emitted:
            return ""
        out, self.emitted = self.text[self.emitted:end], end
        return out

    def _decode(self, start: int, stop: int | None = None) -> str:
        return self.tok.decode(self.ids[start:stop], skip_special_tokens=True)

    def _find_stop(self, start: int) -> None:
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            at, self.stop_string = min(hits)
            self.text, self.stopped = self.text[:at], True

    def _length_before(self, index: int) -> int:
        """len(decode(ids[:index])) for index >= the seam, from a window decode when it agrees."""
        window = self._decode(self._ctx, index)
        if window.startswith(self._ctx_text):
            return self._seam_chars + len(window) - len(self._ctx_text)
        return len(self._decode(0, index))

    def _move_seam(self) -> None:
        """Put the seam before the last id (and its byte run) if a fresh window decode agrees with the text."""
        seam = min(self.run_start, len(self.ids)) - 1
        if seam <= self._seam:
            return
        ctx = max(0, seam - self.CONTEXT)
        while ctx > 0 and self._byte[ctx]:
            ctx -= 1
        ctx_text, window = self._decode(ctx, seam), self._decode(ctx)
        tail = window[len(ctx_text):]
        if window.startswith(ctx_text) and self.text.endswith(tail) and len(tail) <= len(self.text):
            self._seam, self._seam_chars, self._ctx, self._ctx_text = seam, len(self.text) - len(tail), ctx, ctx_text


def eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for src in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(src, "eos_token_id", None)
        ids.update(value if isinstance(value, (list, tuple)) else [value] if value is not None else [])
    return ids
