"""Names the command line offers, without importing torch (so `promptcache validate` starts fast).

`models.load` and `testing` hold the objects behind these names; a test keeps the lists equal.
"""

from __future__ import annotations

ARCHS: tuple[str, ...] = ("llama", "falcon", "mpt", "mistral", "qwen2", "gemma3")  # tiny random-weight families
BUILTIN_MODEL_NAMES: tuple[str, ...] = ("smollm2-135m-instruct", "gemma3-270m")
TINY_MODEL_NAMES: tuple[str, ...] = ("tiny", *(f"tiny-{arch}" for arch in ARCHS))
DTYPE_NAMES: tuple[str, ...] = ("float32", "float16", "bfloat16")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda", "cuda:N", "mps")


def nearest_model_name(name: str) -> str | None:
    """The built-in model name closest to `name` (a typo, a missing suffix), or None when none is close."""
    import difflib

    names = (*BUILTIN_MODEL_NAMES, *TINY_MODEL_NAMES)
    given = name.strip().lower()
    starts = [n for n in names if given and len(given) >= 4 and (n.startswith(given) or given.startswith(n))]
    if starts:
        return starts[0]
    close = difflib.get_close_matches(given, names, n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(name: str) -> str:
    """"; did you mean 'X'?" for the nearest built-in name, or ""."""
    near = nearest_model_name(name)
    return f"; did you mean '{near}'?" if near is not None and near != name else ""
