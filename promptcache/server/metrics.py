"""`Metrics`: the server's counters, rendered in Prometheus' text format for `GET /metrics`.

Counters are kept by the server (per instance, under one lock); gauges are read at scrape time
from the engine (module store bytes per tier, prefix-cache bytes, idle request-cache bytes) and
from the gate (requests running and queued).
"""

from __future__ import annotations

import threading
from collections import Counter

from ..engine.usage import Usage

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

_COUNTERS = {
    "prompt_tokens": "Prompt tokens of completed requests, cached ones included.",
    "cached_tokens": "Prompt tokens whose states were read from a cache (modules or prefixes).",
    "cache_write_tokens": "Prompt tokens whose states were computed and stored for reuse.",
    "completion_tokens": "Generated tokens of completed requests.",
    "module_hits": "PML modules spliced from the module store.",
    "modules_written": "PML modules (re-)encoded by requests.",
    "requests_cancelled": "Requests stopped because the client went away (generation stopped, cache freed).",
}


class Metrics:
    """Request and token counters, and a TTFT histogram."""

    def __init__(self):
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, int]] = Counter()  # (endpoint, status) -> count
        self._counts: Counter[str] = Counter()
        self._ttft = [0] * len(TTFT_BUCKETS)
        self._ttft_sum, self._ttft_count = 0.0, 0
        self._queue_sum = 0.0

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self._requests[(endpoint, status)] += 1

    def completed(self, usage: Usage, queued_s: float) -> None:
        """Count a finished generation's tokens, module hits and TTFT."""
        with self._lock:
            c = self._counts
            c["prompt_tokens"] += usage.input_tokens
            c["cached_tokens"] += usage.cached_tokens
            c["cache_write_tokens"] += usage.cache_write_tokens
            c["completion_tokens"] += usage.output_tokens
            c["module_hits"] += len(usage.modules_hit)
            c["modules_written"] += len(usage.modules_written)
            for i, bound in enumerate(TTFT_BUCKETS):
                self._ttft[i] += usage.ttft_s <= bound
            self._ttft_sum += usage.ttft_s
            self._ttft_count += 1
            self._queue_sum += queued_s

    def cancelled(self) -> None:
        with self._lock:
            self._counts["requests_cancelled"] += 1

    def render(self, gauges: dict[str, tuple[str, dict[tuple[tuple[str, str], ...], float]]]) -> str:
        """Prometheus text exposition: the counters, then `gauges` (name -> (help, {labels: value}))."""
        with self._lock:
            lines = _family("promptcache_requests_total", "counter", "HTTP requests by endpoint and status.",
                            {(("endpoint", e), ("status", str(s))): n for (e, s), n in sorted(self._requests.items())})
            for name, help_text in _COUNTERS.items():
                lines += _family(f"promptcache_{name}_total", "counter", help_text, {(): self._counts[name]})
            lines += self._histogram()
            lines += _family("promptcache_queue_wait_seconds_total", "counter",
                             "Seconds completed requests spent waiting for a run slot.", {(): self._queue_sum})
        for name, (help_text, values) in gauges.items():
            lines += _family(f"promptcache_{name}", "gauge", help_text, values)
        return "\n".join(lines) + "\n"

    def _histogram(self) -> list[str]:
        name = "promptcache_ttft_seconds"
        lines = [f"# HELP {name} Time to first token of completed requests (engine: plan, prefill, first pick).",
                 f"# TYPE {name} histogram"]
        for bound, n in zip(TTFT_BUCKETS, self._ttft):
            lines.append(f'{name}_bucket{{le="{bound:g}"}} {n}')
        lines += [f'{name}_bucket{{le="+Inf"}} {self._ttft_count}', f"{name}_sum {self._ttft_sum:.6f}",
                  f"{name}_count {self._ttft_count}"]
        return lines


def _family(name: str, kind: str, help_text: str, values: dict[tuple[tuple[str, str], ...], float]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in values.items():
        label = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
        lines.append(f"{name}{{{label}}} {_number(value)}" if label else f"{name} {_number(value)}")
    return lines


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.6f}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
