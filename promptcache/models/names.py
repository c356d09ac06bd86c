"""Names the command line offers, without importing torch (so `promptcache validate` starts fast).

`models.load` and `testing` hold the objects behind these names; a test keeps the lists equal.
"""

from __future__ import annotations

ARCHS: tuple[str, ...] = ("llama", "falcon", "mpt", "mistral", "qwen2", "gemma3")  # tiny random-weight families
BUILTIN_MODEL_NAMES: tuple[str, ...] = ("smollm2-135m-instruct", "gemma3-270m")
TINY_MODEL_NAMES: tuple[str, ...] = ("tiny", *(f"tiny-{arch}" for arch in ARCHS))
DTYPE_NAMES: tuple[str, ...] = ("float32", "float16", "bfloat16")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda", "cuda:N", "mps")
