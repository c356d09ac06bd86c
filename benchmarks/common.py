"""Shared benchmark helpers: device-synchronised timing, model construction, filler text, hardware.

Timing rules (STYLE.md): warm-up runs are excluded, the device is synchronised around every timed
region (CUDA events on a GPU), each setting is repeated and reported as the median, and ratios are
taken between measurements of the same run.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from promptcache.errors import PromptCacheError  # noqa: E402
from promptcache.models import load  # noqa: E402
from promptcache.testing import ARCHS  # noqa: E402

BUILTIN = ARCHS  # llama, falcon, mpt, mistral, qwen2: random-weight bench shapes
# The target shape: a small but real-width decoder (head_dim 64, 16 heads), random weights.
BENCH_SHAPE = {"hidden_size": 1024, "num_layers": 8}


# ---- timing ---------------------------------------------------------------------------------------

def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device | str, repeat: int = 5, warmup: int = 1,
            setup: Callable[[], object] | None = None) -> list[float]:
    """Milliseconds of `fn()` per repetition (warm-ups excluded); `setup()` runs untimed before each."""
    device = torch.device(device)
    times = []
    for i in range(warmup + repeat):
        if setup is not None:
            setup()
        sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            elapsed = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            elapsed = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(elapsed)
    return times


Timed = Callable[[], object] | tuple[Callable[[], object], Callable[[], object]]


def time_interleaved(settings: dict[str, Timed], device: torch.device | str, repeat: int = 5,
                     warmup: int = 1) -> dict[str, list[float]]:
    """Milliseconds per repetition of several settings, timed round-robin.

    Each value is `fn` or `(fn, setup)`. Round-robin order means a load change on a shared machine
    hits every setting alike, so ratios between them stay meaningful.
    """
    pairs = {k: v if isinstance(v, tuple) else (v, None) for k, v in settings.items()}
    for fn, setup in pairs.values():
        time_ms(fn, device, repeat=0, warmup=warmup, setup=setup)
    times: dict[str, list[float]] = {k: [] for k in pairs}
    for _ in range(repeat):
        for k, (fn, setup) in pairs.items():
            times[k] += time_ms(fn, device, repeat=1, warmup=0, setup=setup)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


# ---- environment ----------------------------------------------------------------------------------

def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: torch.device | str) -> str:
    """A human-readable name of what ran the benchmark."""
    device = torch.device(device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    host = f"{cpu_name()} ({cores} cores, {torch.get_num_threads()} torch threads)"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}; host {host}"
    return host


def load_average() -> float | None:
    """The 1-minute load average: on a shared machine, a value above the core count means contention."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def versions() -> dict[str, str]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def resolve_device(name: str) -> torch.device:
    """`promptcache.models.load.resolve_device`, its error as a one-line exit."""
    try:
        return load.resolve_device(name)
    except PromptCacheError as e:
        raise SystemExit(f"--device: {e}") from None


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`promptcache.models.load.resolve_dtype`; "auto" is bfloat16 off the CPU (random weights have no dtype)."""
    try:
        return load.resolve_dtype(name, device, auto=torch.bfloat16)
    except PromptCacheError as e:
        raise SystemExit(f"--dtype: {e}") from None


# ---- models ---------------------------------------------------------------------------------------

def load_model(name: str, device: torch.device, dtype: torch.dtype, max_positions: int = 4096,
               shape: dict | None = None):
    """(model, tokenizer, label): a built-in random model of family `name`, or a checkpoint path."""
    if name in BUILTIN:
        from promptcache.testing import tiny_model

        shape = BENCH_SHAPE if shape is None else shape
        model, tok = tiny_model(name, seed=0, max_positions=max_positions, dtype=dtype, **shape)
        label = f"{name}-h{shape['hidden_size']}x{shape['num_layers']}"
    elif Path(name).is_dir():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=True).eval()
        label = Path(name).name
    else:
        raise SystemExit(f"unknown model {name!r}: expected one of {', '.join(BUILTIN)} or a local directory")
    return model.to(device), tok, label


# ---- text -----------------------------------------------------------------------------------------

_WORDS = ("the city hotel flight budget question answer document summary travel plan days water air "
          "earth people house picture mother father world light change follow large small great little "
          "round year show good name very through just form sentence think help line move right old same "
          "tell three want well also play end home read hand port even land here must high such").split()


def _words(n: int, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        sentence = [rng.choice(_WORDS) for _ in range(rng.randint(6, 18))]
        sentence[0] = sentence[0].capitalize()
        sentence[-1] += "."
        out.extend(sentence)
    return out[:n]


def filler_text(tokenizer, n_tokens: int, seed: int = 1234) -> str:
    """Deterministic prose (one text per seed) that tokenizes, without special tokens, to about `n_tokens`."""
    def count(k: int) -> int:
        return len(tokenizer(" ".join(words[:k]), add_special_tokens=False).input_ids)

    words = _words(max(64, n_tokens * 2), seed)
    while count(len(words)) < n_tokens:
        words = _words(2 * len(words), seed)
    lo, hi = 1, len(words)  # largest k with count(k) <= n_tokens
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if count(mid) <= n_tokens else (lo, mid - 1)
    return " ".join(words[:lo])


# ---- output ---------------------------------------------------------------------------------------

def result_payload(benchmark: str, device: torch.device, dtype: torch.dtype, load_start: float | None,
                   argv: list[str] | None, rows: list[dict], **extra) -> dict:
    """The JSON every benchmark writes: what ran, on what hardware and versions, under what load; its rows."""
    return {"benchmark": benchmark, "hardware": hardware(device), "device": str(device), "dtype": str(dtype),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "versions": versions(),
            "load_average_1m": {"start": load_start, "end": load_average()},
            "argv": sys.argv[1:] if argv is None else list(argv), **extra, "rows": rows}

def write_json(out_dir: str | Path, name: str, payload: dict) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def table(rows: list[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """A fixed-width text table; columns are (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([("-" if r.get(k) is None else format(r[k], f)) for k, _, f in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
