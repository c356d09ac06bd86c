"""Statistics of streamed requests: time to first token, inter-token latency, output throughput, and
how much a long prompt being prefilled stalls the streams running beside it.

All times are `time.perf_counter()` seconds of the client process. A stream's tokens are the chunks
that carried text: inter-token latency (ITL) is the gap between two consecutive ones of the same
stream, so it is per stream, never between different clients' tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Stream:
    """One streamed request as its client saw it."""

    sent: float
    token_times: list[float] = field(default_factory=list)  # arrival of each chunk with text
    output_tokens: int | None = None  # the server's usage.completion_tokens, when it reported it
    prompt_tokens: int | None = None
    cached_tokens: int | None = None  # prompt tokens read from a cache, when the server said
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.sent if self.token_times else None

    @property
    def tokens(self) -> int:
        """Tokens generated: the server's count, else the text chunks received."""
        return self.output_tokens if self.output_tokens is not None else len(self.token_times)

    def gaps(self) -> list[Gap]:
        return [Gap(a, b) for a, b in zip(self.token_times, self.token_times[1:])]


@dataclass(frozen=True)
class Gap:
    """The wait between two consecutive tokens of one stream."""

    start: float
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start

    def overlaps(self, window: Window) -> bool:
        return self.start < window.end and self.end > window.start


@dataclass(frozen=True)
class Window:
    """While a long prompt was prefilled: from its request to its first token."""

    start: float
    end: float


@dataclass
class LevelRun:
    """One closed-loop run of a level: its streams, its wall time, and the long request (mix workload)."""

    streams: list[Stream]
    wall_s: float
    long: Stream | None = None

    @property
    def window(self) -> Window | None:
        if self.long is None or not self.long.token_times:
            return None
        return Window(self.long.sent, self.long.token_times[0])


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class StallSplit:
    """Inter-token gaps (seconds) of the running streams: those overlapping a long prefill, the others."""

    during: list[float]
    outside: list[float]


def split_gaps(streams: Sequence[Stream], window: Window) -> StallSplit:
    """A gap is `during` the window when the two intervals overlap at all (a stream stalled by the
    prefill has one long gap spanning it)."""
    gaps = [g for s in streams for g in s.gaps()]
    return StallSplit(during=[g.seconds for g in gaps if g.overlaps(window)],
                      outside=[g.seconds for g in gaps if not g.overlaps(window)])


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1e3


def _mean(values: list[int]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(runs: Sequence[LevelRun]) -> dict:
    """One row of statistics over the runs of a level (rounds pooled; their wall times added).

    Streams that failed are counted in `errors` and left out of every other field. With long requests
    (the mix workload), `itl_p99_during_ms` is the p99 of the gaps that overlap a long prefill,
    `itl_p50_outside_ms` the p50 of the others, and `stall_ratio` the first over the second.
    """
    streams = [s for run in runs for s in run.streams]
    ok = [s for s in streams if s.error is None and s.token_times]
    wall = sum(run.wall_s for run in runs)
    ttfts = [s.ttft for s in ok]
    gaps = [g.seconds for s in ok for g in s.gaps()]
    tokens = sum(s.tokens for s in ok)
    row = {"requests": len(ok), "errors": len(streams) - len(ok), "wall_s": round(wall, 3),
           "output_tokens": tokens, "output_tokens_per_s": tokens / wall if wall > 0 else None,
           "ttft_p50_ms": _ms(percentile(ttfts, 0.5)), "ttft_p99_ms": _ms(percentile(ttfts, 0.99)),
           "itl_p50_ms": _ms(percentile(gaps, 0.5)), "itl_p99_ms": _ms(percentile(gaps, 0.99)),
           "prompt_tokens_mean": _mean([s.prompt_tokens for s in ok if s.prompt_tokens is not None]),
           "cached_tokens_mean": _mean([s.cached_tokens for s in ok if s.cached_tokens is not None])}
    longs = [run for run in runs if run.long is not None]
    if longs:
        splits = [split_gaps([s for s in run.streams if s.error is None], run.window)
                  for run in longs if run.window is not None]
        during = [g for sp in splits for g in sp.during]
        outside = [g for sp in splits for g in sp.outside]
        p99, p50 = percentile(during, 0.99), percentile(outside, 0.5)
        row.update({"long_requests": len(longs), "long_errors": sum(run.window is None for run in longs),
                    "long_ttft_ms": _ms(percentile([run.long.ttft for run in longs if run.window], 0.5)),
                    "long_prompt_tokens": _mean([r.long.prompt_tokens for r in longs
                                                 if r.long.prompt_tokens is not None]),
                    "gaps_during": len(during), "itl_p99_during_ms": _ms(p99), "itl_p50_outside_ms": _ms(p50),
                    "stall_ratio": p99 / p50 if p99 is not None and p50 else None})
    return row
