"""GGUF files converted once into transformers checkpoints, kept in a local cache keyed by content.

Reading a GGUF file with transformers dequantizes every tensor and rebuilds the tokenizer from the
file's vocabulary: tens of seconds for a 135M model on a small CPU. The first load therefore saves
the result as an ordinary checkpoint (safetensors weights, config, tokenizer), and later loads read
that in about a second.

    <cache>/                                 PROMPTCACHE_CACHE_DIR, else $XDG_CACHE_HOME/promptcache,
                                             else ~/.cache/promptcache
        digests/<key>                        a file's sha256, keyed by (path, size, mtime_ns)
        gguf/<sha256>/                       a complete checkpoint, with promptcache-gguf.json last in
        gguf/.tmp-<sha256[:16]>-<pid>-<rand>/ a conversion in progress (or one whose writer died)
        gguf/<sha256>.lock                   held while converting: one converter per file at a time
        modules/                             module states the commands persist (`default_store_dir`)

A checkpoint is written into a temp dir beside its final place and renamed into place only when
complete, so readers see a whole checkpoint or none. Temp dirs whose writer is gone are deleted
by the next conversion.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import PromptError

logger = logging.getLogger(__name__)

CACHE_ENV = "PROMPTCACHE_CACHE_DIR"
MANIFEST = "promptcache-gguf.json"  # written last into a checkpoint: its presence means complete
TEMP_PREFIX = ".tmp-"
STALE_AFTER_S = 24 * 3600  # a temp dir this old is abandoned even if its pid is alive (another host)
_CHUNK = 1 << 22


@dataclass(frozen=True)
class Conversion:
    """Where a GGUF file's checkpoint is, and whether this call wrote it.

    Attributes:
        checkpoint: the checkpoint directory (load it with `from_pretrained`).
        digest: sha256 of the GGUF file's bytes (the cache key).
        converted: True when this call converted the file, False when the cache had it.
        seconds: time spent converting (0.0 when cached).
    """

    checkpoint: Path
    digest: str
    converted: bool
    seconds: float = 0.0


def cache_root() -> Path:
    """The cache directory: $PROMPTCACHE_CACHE_DIR, else $XDG_CACHE_HOME/promptcache, else ~/.cache/promptcache."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "promptcache"


def default_store_dir() -> Path:
    """Where `demo.py`, `promptcache run` and `serve` persist module states unless told otherwise."""
    return cache_root() / "modules"


def file_digest(path: str | os.PathLike, cache: str | os.PathLike | None = None) -> str:
    """The sha256 of a file's bytes, hashed once per (resolved path, size, mtime_ns).

    NOTE: a rewrite that keeps the size and restores the mtime is not noticed; any ordinary
    write, copy or download changes the mtime.

    Args:
        path: the file.
        cache: cache directory (default: `cache_root()`); the digest is remembered under it.

    Returns:
        The hex digest.
    """
    path = Path(path).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:32]
    record = Path(cache if cache is not None else cache_root()) / "digests" / key
    with contextlib.suppress(OSError):
        digest = record.read_text(encoding="ascii").strip()
        if len(digest) == 64:
            return digest
    digest = _sha256(path)
    with contextlib.suppress(OSError):  # a read-only cache only costs a re-hash next time
        _write_atomically(record, digest)
    return digest


def checkpoint_dir(path: str | os.PathLike, cache: str | os.PathLike | None = None) -> Path:
    """Where the checkpoint converted from the GGUF file at `path` is (or will be) kept."""
    root = Path(cache if cache is not None else cache_root())
    return root / "gguf" / file_digest(path, root)


def is_complete(checkpoint: Path) -> bool:
    """True for a checkpoint a conversion finished (its manifest is written last)."""
    return (checkpoint / MANIFEST).is_file()


def ensure_converted(path: str | os.PathLike, cache: str | os.PathLike | None = None) -> Conversion:
    """The transformers checkpoint of a GGUF file, converting it on first use.

    Args:
        path: a `.gguf` file of an architecture transformers' GGUF loader supports.
        cache: cache directory (default: `cache_root()`).

    Returns:
        A `Conversion`.

    Raises:
        PromptError: the file cannot be read or converted (not GGUF, unsupported architecture),
            or the cache directory cannot be written.
    """
    path = Path(path)
    root = Path(cache if cache is not None else cache_root())
    try:
        final = checkpoint_dir(path, root)
        if is_complete(final):
            return Conversion(final, final.name, converted=False)
        final.parent.mkdir(parents=True, exist_ok=True)
        with _locked(final.parent / f"{final.name}.lock"):
            if is_complete(final):  # another process converted it while we waited
                return Conversion(final, final.name, converted=False)
            return _convert_once(path, final)
    except OSError as e:
        raise PromptError(f"cannot convert GGUF file '{path}' into the cache '{root}': {e}") from e


def remove_stale_temps(parent: Path) -> list[Path]:
    """Delete temp dirs in `parent` whose writer process is gone (or that are over a day old)."""
    removed = []
    for entry in parent.glob(TEMP_PREFIX + "*"):
        if entry.is_dir() and _abandoned(entry):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    if removed:
        logger.info("removed %d abandoned conversion dir(s) in %s", len(removed), parent)
    return removed


# ---- steps -----------------------------------------------------------------------------------------


def _convert_once(path: Path, final: Path) -> Conversion:
    remove_stale_temps(final.parent)
    if final.exists():  # not complete (is_complete was False): not ours to trust
        _discard(final)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{final.name[:16]}-{os.getpid()}-", dir=final.parent))
    try:
        _write_checkpoint(path, tmp, final.name)
        published = _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start
    logger.info("converted %s into %s in %.1f s", path, final, seconds)
    return Conversion(final, final.name, converted=published, seconds=seconds if published else 0.0)


def _write_checkpoint(path: Path, out: Path, digest: str) -> None:
    """Read the GGUF file with transformers (dequantized to float32) and save it as a checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=path.name, local_files_only=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kwargs, **_dense())
    except Exception as e:  # gguf/transformers raise many kinds for a bad or unsupported file
        raise PromptError(f"cannot convert GGUF file '{path}': {type(e).__name__}: {e}") from e
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    manifest = {"source": str(path.resolve()), "sha256": digest, "size": path.stat().st_size,
                "model_type": model.config.model_type, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _dense() -> dict:
    """Ask transformers for plain dense weights (which can be saved), where it could keep GGUF blocks."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantize
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _publish(tmp: Path, final: Path) -> bool:
    """Rename `tmp` to `final`; False (and `tmp` deleted) when another writer got there first."""
    try:
        os.rename(tmp, final)
        return True
    except OSError:
        if not is_complete(final):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return False


def _discard(path: Path) -> None:
    """Move an incomplete checkpoint out of the way (renamed first, so no reader picks it up)."""
    aside = path.with_name(f"{TEMP_PREFIX}{path.name[:16]}-0-incomplete{time.time_ns()}")
    os.rename(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _abandoned(entry: Path) -> bool:
    try:
        age = time.time() - entry.stat().st_mtime
    except OSError:
        return False
    parts = entry.name[len(TEMP_PREFIX):].split("-")
    pid = int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else 0
    return age > STALE_AFTER_S or pid <= 0 or not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OverflowError, OSError):  # not ours to signal (PermissionError), or not a valid pid
        return True
    return True


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock (released by the OS if the holder dies); a no-op without fcntl."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomically(target: Path, text: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(text)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
