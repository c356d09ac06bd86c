"""`FileStore`: one file per hex key in a sharded directory, for the disk store and the response cache.

Layout: `<root>/<key[:2]>/<key><suffix>`. Keys are 16-64 lowercase hex characters, so a key never
escapes the root.

What it promises:
- Writes are atomic: a temp file in the same directory is written, fsynced and renamed over the
  final name, so a reader sees the old file or the whole new one, never a partial one.
- A failed write (full disk, read-only directory, a directory squatting on the key's path) is
  logged, counted in `write_failures` and reported as False: a cache problem never fails a request.
- Only regular files are opened, without following a symlink and without blocking: a FIFO, device,
  directory or symlink at a key's path is a miss (logged, counted in `read_failures`), never a hang
  or a crash. The caller reads the file into memory it owns; nothing stays mapped.
- A file the caller finds corrupt is deleted (`discard`), unless it was replaced in the meantime.
- Each store has a secret (`secret`, in `<root>/.secret`, mode 0600, made on first open) that keys the
  checksums its callers write: a file edited by anyone who cannot read the secret fails its check.
  Whoever can read the secret (the store's owner, root) can forge files that pass: the store trusts
  them, and only them, with its contents. Write access to the directory alone lets one delete files,
  which is a miss, never a wrong answer.
- Temp files of writers that died mid-write (`kill -9`) are removed when the store is opened: those
  whose writer pid no longer runs and that were not written for `TEMP_GRACE_S`, and any not written
  for `TEMP_MAX_AGE_S`. A live writer's temp file is left alone.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import BinaryIO

from promptcache.errors import StoreError

logger = logging.getLogger(__name__)

KEY_RE = re.compile(r"[0-9a-f]{16,64}")
TMP_PREFIX = ".tmp-"
TMP_SUFFIX = ".part"
_TMP_RE = re.compile(re.escape(TMP_PREFIX) + r"(?:(\d+)-)?.*" + re.escape(TMP_SUFFIX))
TEMP_GRACE_S = 60.0          # a dead writer's temp file idle this long is removed on open
TEMP_MAX_AGE_S = 3600.0      # any temp file idle this long is removed on open (pid reused, other host)
SECRET_NAME = ".secret"
SECRET_BYTES = 32
_MISSING = (FileNotFoundError, NotADirectoryError)


def check_key(key: str) -> str:
    """Returns `key` if it is 16-64 lowercase hex characters (so it can never escape the store's root).

    Raises:
        StoreError: any other key.
    """
    if not isinstance(key, str) or not KEY_RE.fullmatch(key):
        raise StoreError(f"store keys are 16-64 lowercase hex characters, got {key!r}")
    return key


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers only ever see the old file or the whole new one.

    A temp file in the same directory is written and fsynced, then renamed over `path`; a process killed
    mid-write leaves at most a stale `.tmp-*` file, never a partial file under the final name.

    Raises:
        OSError: the directory cannot be created or written, the disk is full, ...
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def open_regular(path: Path) -> BinaryIO:
    """Open `path` for reading if it is a regular file; never follows a symlink, never blocks.

    Raises:
        FileNotFoundError / NotADirectoryError: nothing there.
        OSError: anything else there (a FIFO, device, directory or symlink), or it cannot be opened.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(f"not a regular file (mode {stat.filemode(mode)})")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class FileStore:
    """Files by key under `root` (created if missing). Thread-safe.

    Args:
        root: the directory.
        suffix: file name suffix, e.g. ".json".
        argument: the user-facing name of `root` (e.g. "store_dir"), for error messages.

    Raises:
        StoreError: `root` is empty (which would mean the current directory) or cannot be created.
    """

    def __init__(self, root: str | os.PathLike, suffix: str, *, argument: str):
        if not isinstance(root, (str, os.PathLike)) or not str(os.fspath(root)).strip():
            raise StoreError(f"{argument} must be a directory path, got {root!r} (an empty path would write "
                             f"into the current directory)")
        self.root = Path(root)
        self.suffix = suffix
        self.argument = argument
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot use {argument}={str(self.root)!r} as a directory: {e}") from e
        self._lock = threading.RLock()
        self.write_failures = 0
        self.read_failures = 0
        self.secret = store_secret(self.root, argument)
        remove_dead_temp_files(self.root)

    def path(self, key: str) -> Path:
        """Where `key`'s file lives (whether or not it exists)."""
        check_key(key)
        return self.root / key[:2] / (key + self.suffix)

    def open(self, key: str) -> BinaryIO | None:
        """`key`'s file opened for reading; None when absent or not a regular file (logged, counted)."""
        path = self.path(key)
        try:
            return open_regular(path)
        except FileNotFoundError:
            return None
        except OSError as e:
            self._count_read_failure("ignoring %s in %s: %s", path, self.argument, e)
            return None

    def write(self, key: str, data: bytes) -> bool:
        """Atomically replace `key`'s file with `data`; False (logged, counted) when that fails."""
        path = self.path(key)
        try:
            with self._lock:
                atomic_write(path, data)
            return True
        except OSError as e:
            self.write_failed(key, str(e))
            return False

    def write_failed(self, key: str, reason: str) -> None:
        """Count (in `write_failures`) and log a write of `key` that did not happen, for `reason`."""
        with self._lock:
            self.write_failures += 1
        logger.warning("could not write %s in %s (served without it): %s", self.path(key), self.argument, reason)

    def discard(self, key: str, f: BinaryIO, reason: str) -> None:
        """Delete `key`'s file read as `f` because it is bad (logged, counted), unless it was replaced since."""
        path = self.path(key)
        self._count_read_failure("discarding %s: %s", path, reason)
        seen = os.fstat(f.fileno())
        with self._lock:
            try:
                now = os.lstat(path)
                if (now.st_dev, now.st_ino) == (seen.st_dev, seen.st_ino):
                    path.unlink()
            except _MISSING:
                pass
            except OSError as e:
                logger.warning("could not delete %s: %s", path, e)

    def delete(self, key: str) -> bool:
        """Remove `key`'s file; returns whether there was one (a directory there is left alone)."""
        path = self.path(key)
        with self._lock:
            if not self._is_file(path):
                return False
            try:
                path.unlink()
                return True
            except _MISSING:
                return False

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and KEY_RE.fullmatch(key) is not None and self._is_file(self.path(key))

    def keys(self) -> list[str]:
        """All keys with a regular file, sorted (stale temp files from killed writers are ignored)."""
        return sorted(p.name[: -len(self.suffix)] for p in self._files())

    def nbytes(self) -> int:
        """Total size of the files."""
        total = 0
        for p in self._files():
            try:
                total += os.lstat(p).st_size
            except _MISSING:  # deleted concurrently
                pass
        return total

    def _files(self) -> list[Path]:
        n = len(self.suffix)
        return [p for p in self.root.glob("??/*" + self.suffix)
                if KEY_RE.fullmatch(p.name[:-n]) and p.parent.name == p.name[:2] and self._is_file(p)]

    @staticmethod
    def _is_file(path: Path) -> bool:
        try:
            return stat.S_ISREG(os.lstat(path).st_mode)
        except OSError:
            return False

    def _count_read_failure(self, message: str, *args: object) -> None:
        with self._lock:
            self.read_failures += 1
        logger.warning(message, *args)


def store_secret(root: Path, argument: str = "store_dir") -> bytes:
    """The secret of the store at `root`: read from `<root>/.secret`, or made there (mode 0600) on first use.

    Where none can be made (a read-only directory), a secret of this process only: every file is a miss.

    Raises:
        StoreError: the file is not a regular file of `SECRET_BYTES` bytes, or others than its owner
            may read or write it (chmod 600 it, or delete it: the store's files then become misses).
    """
    path = root / SECRET_NAME
    try:
        return _read_secret(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise StoreError(f"cannot use the secret {path} of {argument}: {e}") from e
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", suffix=TMP_SUFFIX, dir=root)  # mode 0600
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(SECRET_BYTES))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # never replaces a secret another process made meanwhile
        except FileExistsError:
            pass
        return _read_secret(path)
    except OSError as e:  # a read-only directory: nothing can be written, and no file can be verified
        logger.warning("cannot make the secret %s of %s (%s): every file there is a miss", path, argument, e)
        return secrets.token_bytes(SECRET_BYTES)
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _read_secret(path: Path) -> bytes:
    with open_regular(path) as f:
        mode = os.fstat(f.fileno()).st_mode
        if mode & 0o077:
            raise OSError(f"its mode is {stat.filemode(mode)}: only its owner may read it (chmod 600)")
        data = f.read(SECRET_BYTES + 1)
    if len(data) != SECRET_BYTES:
        raise OSError(f"it holds {len(data)} bytes, not {SECRET_BYTES}")
    return data


def remove_dead_temp_files(root: Path, now: float | None = None) -> int:
    """Remove temp files under `root` left by writers that died (see the module docstring); how many went."""
    now = time.time() if now is None else now
    removed = 0
    for path in [*root.glob(TMP_PREFIX + "*" + TMP_SUFFIX), *root.glob("??/" + TMP_PREFIX + "*" + TMP_SUFFIX)]:
        match = _TMP_RE.fullmatch(path.name)
        try:
            st = os.lstat(path)
            idle = now - st.st_mtime
            dead = match is not None and match.group(1) is not None and not _running(int(match.group(1)))
            if stat.S_ISREG(st.st_mode) and (idle > TEMP_MAX_AGE_S or (dead and idle > TEMP_GRACE_S)):
                path.unlink()
                removed += 1
        except OSError:  # gone meanwhile, or not ours to remove
            continue
    if removed:
        logger.info("removed %d temp files of dead writers from %s", removed, root)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process, or not a pid we can ask about: assume it writes
    return True


class FileBacked:
    """Base of a store kept in a `FileStore` (`self.files`): its key-level verbs and failure counters."""

    files: FileStore

    @property
    def root(self) -> Path:
        return self.files.root

    def path(self, key: str) -> Path:
        """Where `key`'s file lives (whether or not it exists)."""
        return self.files.path(key)

    def delete(self, key: str) -> bool:
        """Remove `key`'s file; returns whether there was one."""
        return self.files.delete(key)

    def __contains__(self, key: object) -> bool:
        """Whether a regular file exists for `key` (unverified: a load may still find it bad)."""
        return key in self.files

    def keys(self) -> list[str]:
        """All stored keys, sorted (stale temp files from killed writers are ignored)."""
        return self.files.keys()

    def nbytes(self) -> int:
        """Total size of the stored files."""
        return self.files.nbytes()

    @property
    def write_failures(self) -> int:
        """Writes that failed (full disk, read-only directory, ...) since this store was opened."""
        return self.files.write_failures

    @property
    def read_failures(self) -> int:
        """Files found corrupt or not regular files since this store was opened."""
        return self.files.read_failures
