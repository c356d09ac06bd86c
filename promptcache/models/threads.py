"""How many CPU threads torch's operators use: one per free core, chosen when a command starts.

torch's default is one thread per core. On a CPU shared with other jobs that is several times
slower than one thread (measured on 2 cores under load: a cached request 3.3 s against 0.39 s,
encoding 53 s against 21 s): each parallel region waits for its slowest thread, and a thread whose
core is busy runs a fraction of the time. One thread on an idle machine, on the other hand, is
slower than all of them. So the commands (`demo.py`, `promptcache ...`) pick the number of cores
that are free *now*:

    busy  = cores busy over the last 0.25 s     # /proc/stat on Linux; else the 1-minute load average
    free  = cores - busy
    threads = clamp(round(free), 1, cores)

NOTE: not the load average where /proc/stat exists: it lags a new job by a minute, and it still
counts this program's own previous run for a minute after it ended (a second demo run would take
one thread on an idle machine). Too few threads costs at most the idle machine's speed-up of the
extra threads; too many, under load, several times. An explicit `--threads N`,
`$PROMPTCACHE_THREADS` or `$OMP_NUM_THREADS` wins over the guess. The choice is made once per
process: a server that starts on an idle machine keeps its threads when the load comes later
(`--threads 1` pins it).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from ..errors import PromptCacheError

logger = logging.getLogger(__name__)

THREADS_ENV = "PROMPTCACHE_THREADS"
SAMPLE_S = 0.25  # how long the instantaneous CPU share is measured


@dataclass(frozen=True)
class ThreadChoice:
    """The threads a process uses and why.

    Attributes:
        threads: torch's intra-op threads.
        cores: the cores this process may run on.
        busy: the cores other work kept busy when the choice was made (None when not measured).
        reason: one line: "--threads", "$OMP_NUM_THREADS", or the load it was chosen from.
    """

    threads: int
    cores: int
    busy: float | None
    reason: str

    def describe(self) -> str:
        return f"{self.threads} thread{'s' * (self.threads != 1)} of {self.cores} cores ({self.reason})"


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def busy_cores(cores: int, sample_s: float = SAMPLE_S) -> float | None:
    """Cores other work keeps busy: the busy share of the whole CPU over `sample_s` (Linux), else the
    1-minute load average; None when neither can be read."""
    first = _cpu_times()
    if first is not None:
        time.sleep(sample_s)
        second = _cpu_times()
        if second is not None and second[1] > first[1]:
            idle, total = second[0] - first[0], second[1] - first[1]
            return (os.cpu_count() or cores) * (1 - idle / total)
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def choose_threads(cores: int, busy: float | None) -> int:
    """One thread per free core, at least one, at most `cores`; `cores` when the load is unknown."""
    if busy is None:
        return cores
    return max(1, min(cores, round(cores - busy)))


def parse_threads(value: str | int | None, what: str) -> int | None:
    """A positive thread count from a flag or environment variable; PromptCacheError naming it otherwise."""
    if value is None or value == "":
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise PromptCacheError(f"{what} must be a whole number of threads >= 1, got {value!r}")
    return n


def configure_threads(threads: int | None = None) -> ThreadChoice:
    """Set torch's thread count: `threads` if given, else $PROMPTCACHE_THREADS, else leave what
    $OMP_NUM_THREADS set, else one per free core (see the module docstring). Logs the choice."""
    import torch

    cores = usable_cores()
    explicit = parse_threads(threads, "--threads")
    env = parse_threads(os.environ.get(THREADS_ENV), f"${THREADS_ENV}")
    if explicit is not None:
        choice = ThreadChoice(explicit, cores, None, "--threads")
    elif env is not None:
        choice = ThreadChoice(env, cores, None, f"${THREADS_ENV}")
    elif os.environ.get("OMP_NUM_THREADS"):
        choice = ThreadChoice(torch.get_num_threads(), cores, None, "$OMP_NUM_THREADS")
    else:
        busy = busy_cores(cores)
        reason = "load unknown" if busy is None else f"{busy:.1f} of {os.cpu_count() or cores} cores busy"
        choice = ThreadChoice(choose_threads(cores, busy), cores, busy, reason)
    torch.set_num_threads(choice.threads)
    logger.info("torch threads: %s", choice.describe())
    return choice


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies of all CPUs from /proc/stat, or None off Linux."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(v) for v in fields[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return idle, sum(values[:8])  # guest time is already counted in user
