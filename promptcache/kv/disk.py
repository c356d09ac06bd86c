"""Persistent module store: `KVStates` as safetensors files, one per key, written atomically.

Layout: `<root>/<key[:2]>/<key>.safetensors`, tensors `k.{i}`, `v.{i}` ([1, kv_heads, seq, head_dim]),
`positions` and `token_ids` ([seq] int64), metadata: format, version, key, layer count, a sha256 of the
tensor bytes and the caller's meta (JSON). A file that fails any check on load is deleted and reported as
absent, so the caller simply re-encodes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save

from promptcache.errors import PromptCacheError, StoreError
from promptcache.kv.states import KVStates

logger = logging.getLogger(__name__)

FORMAT = "promptcache.kv"
VERSION = "1"
SUFFIX = ".safetensors"
_KEY_RE = re.compile(r"[0-9a-f]{16,64}")
_TMP_PREFIX = ".tmp-"


def states_key(**parts: object) -> str:
    """A stable sha256 hex key over a canonical JSON of `parts` (model identity, dtype, token ids, ...).

    Values may be JSON types, tuples, sets, paths, `torch.dtype`, `torch.device` and tensors (by value).

    Raises:
        PromptCacheError: a value has no stable representation.
    """
    return sha256_json({"kind": "promptcache.states", "parts": parts})


def sha256_json(obj: object) -> str:
    """sha256 hex of the canonical JSON of `obj` (sorted keys, no spaces); see `states_key` for types.

    Raises:
        PromptCacheError: a value has no stable JSON representation.
    """
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False, default=_jsonable)
    except (TypeError, ValueError) as e:
        raise PromptCacheError(f"cannot build a stable key: {e}") from e
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_key(key: str) -> str:
    """Returns `key` if it is 16-64 lowercase hex characters (so it can never escape the store's root).

    Raises:
        StoreError: any other key.
    """
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise StoreError(f"store keys are 16-64 lowercase hex characters, got {key!r}")
    return key


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers only ever see the old file or the whole new one.

    A temp file in the same directory is written and fsynced, then renamed over `path`; a process killed
    mid-write leaves at most a stale `.tmp-*` file, never a partial file under the final name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class DiskStore:
    """`KVStates` on disk under `root`, keyed by `states_key` hex keys. Thread-safe.

    Args:
        root: directory of the store (created if missing).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot use {self.root} as a store directory: {e}") from e
        self._lock = threading.RLock()

    def path(self, key: str) -> Path:
        """Where `key`'s file lives (whether or not it exists)."""
        check_key(key)
        return self.root / key[:2] / (key + SUFFIX)

    def save(self, key: str, states: KVStates, meta: Mapping[str, str] | None = None) -> Path:
        """Write `states` under `key` atomically, replacing any previous file. Returns the file's path."""
        path = self.path(key)
        meta = dict(meta or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise StoreError(f"meta must map str to str, got {meta!r}")
        tensors = _to_tensors(states)
        header = {"format": FORMAT, "version": VERSION, "key": key, "num_layers": str(states.num_layers),
                  "checksum": _checksum(tensors), "meta": json.dumps(meta, sort_keys=True)}
        data = safetensors_save(tensors, metadata=header)
        with self._lock:
            atomic_write(path, data)
        return path

    def load(self, key: str, device: torch.device | str = "cpu") -> KVStates | None:
        """The states saved under `key`, or None when absent or unreadable (the bad file is deleted)."""
        path = self.path(key)
        with self._lock:
            if not path.exists():
                return None
            try:
                states = _read(path, key)
            except Exception as e:  # noqa: BLE001 - any failure means "re-encode", never a crash
                logger.warning("discarding corrupt KV file %s: %s", path, e)
                path.unlink(missing_ok=True)
                return None
        return states if torch.device(device).type == "cpu" else states.to(device)

    def meta(self, key: str) -> dict[str, str] | None:
        """The caller's meta saved with `key` (unverified header read), or None when absent or unreadable."""
        path = self.path(key)
        try:
            with safe_open(str(path), framework="pt") as f:
                return json.loads((f.metadata() or {})["meta"])
        except Exception:  # noqa: BLE001 - load() does the full verification and cleanup
            return None

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and _KEY_RE.fullmatch(key) is not None and self.path(key).exists()

    def delete(self, key: str) -> bool:
        """Remove `key`'s file; returns whether there was one."""
        path = self.path(key)
        with self._lock:
            existed = path.exists()
            path.unlink(missing_ok=True)
            return existed

    def keys(self) -> list[str]:
        """All stored keys, sorted (stale temp files from killed writers are ignored)."""
        return sorted(p.name[: -len(SUFFIX)] for p in self._files())

    def nbytes(self) -> int:
        """Total size of the stored files."""
        total = 0
        for p in self._files():
            try:
                total += p.stat().st_size
            except FileNotFoundError:  # deleted concurrently
                pass
        return total

    def _files(self) -> list[Path]:
        return [p for p in self.root.glob("??/*" + SUFFIX)
                if _KEY_RE.fullmatch(p.name[: -len(SUFFIX)]) and p.parent.name == p.name[:2]]


def _to_tensors(states: KVStates) -> dict[str, torch.Tensor]:
    def cpu(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu").contiguous()

    tensors = {f"k.{i}": cpu(k) for i, k in enumerate(states.keys)}
    tensors |= {f"v.{i}": cpu(v) for i, v in enumerate(states.values)}
    tensors["positions"] = cpu(states.positions).to(torch.int64)
    tensors["token_ids"] = torch.tensor(states.token_ids, dtype=torch.int64)
    return tensors


def _checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _read(path: Path, key: str) -> KVStates:
    """Parse and verify one file; raises (anything) on any mismatch."""
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    if (header.get("format"), header.get("version")) != (FORMAT, VERSION):
        raise StoreError(f"unknown format {header.get('format')!r} version {header.get('version')!r}")
    if header.get("key") != key:
        raise StoreError(f"file holds key {header.get('key')!r}, not {key!r}")
    layers = int(header["num_layers"])
    if not 0 < layers <= len(tensors):
        raise StoreError(f"bad layer count {layers}")
    names = {f"{kv}.{i}" for kv in "kv" for i in range(layers)} | {"positions", "token_ids"}
    if set(tensors) != names:
        raise StoreError(f"tensors {sorted(tensors)} do not match {layers} layers")
    _check_shapes(tensors, layers)
    if _checksum(tensors) != header.get("checksum"):
        raise StoreError("checksum mismatch")
    return KVStates(tuple(tensors["token_ids"].tolist()), tensors["positions"],
                    tuple(tensors[f"k.{i}"] for i in range(layers)),
                    tuple(tensors[f"v.{i}"] for i in range(layers)))


def _check_shapes(tensors: Mapping[str, torch.Tensor], layers: int) -> None:
    seq = tensors["token_ids"].shape[0] if tensors["token_ids"].dim() == 1 else -1
    for name in ("positions", "token_ids"):
        if tensors[name].shape != (seq,) or tensors[name].dtype != torch.int64:
            raise StoreError(f"{name} has shape {tuple(tensors[name].shape)} / {tensors[name].dtype}")
    first = tensors["k.0"]
    for i in range(layers):
        for t in (tensors[f"k.{i}"], tensors[f"v.{i}"]):
            if t.dim() != 4 or t.shape[0] != 1 or t.shape[2] != seq or t.dtype != first.dtype:
                raise StoreError(f"layer {i} tensor has shape {tuple(t.shape)} / {t.dtype}")


def _jsonable(value: object) -> object:
    if isinstance(value, (torch.dtype, torch.device, os.PathLike)):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise PromptCacheError(f"cannot build a stable key from {type(value).__name__} value {value!r}")
