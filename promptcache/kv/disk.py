"""Persistent module store: `KVStates` as safetensors files, one per key, written atomically.

Layout: `<root>/<key[:2]>/<key>.safetensors` (see `kv.files`), tensors `k.{i}`, `v.{i}`
([1, kv_heads, seq, head_dim]), `positions` and `token_ids` ([seq] int64), metadata: format, version, key,
layer count, the caller's meta (JSON) and an HMAC-SHA256 over all of these and every tensor byte, keyed by
the store's secret (`kv.files.store_secret`): whoever cannot read the secret cannot make a file pass.

Loading reads the file into tensors this process owns (never a memory map: a file truncated or
overwritten later, e.g. by `cp` over it, must not crash the process or change states already loaded)
and verifies the checksum, every value finite and, when the caller says what it expects
(`StatesShape`), the layer count, dtype and shapes. A file that fails any check is deleted and
reported as absent, so the caller simply re-encodes. A failed save (full disk, read-only directory)
is logged, counted and reported as False; it never raises to the request being served.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import BinaryIO

import torch
from safetensors.torch import save as safetensors_save

from promptcache.errors import PromptCacheError, StoreError
from promptcache.kv.files import FileBacked, FileStore, check_key
from promptcache.kv.states import KVStates

logger = logging.getLogger(__name__)

FORMAT = "promptcache.kv"
VERSION = "3"  # 2: the checksum covers the header fields too; 3: it is keyed by the store's secret
SUFFIX = ".safetensors"
_HEADER_FIELDS = ("format", "version", "key", "num_layers", "meta")
_MAX_HEADER = 100 << 20  # safetensors' own limit
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}

__all__ = ["DiskStore", "StatesShape", "check_key", "hmac_json", "sha256_json", "states_key"]


@dataclass(frozen=True)
class StatesShape:
    """What a reader relies on: states of this many layers, keys and values [1, kv_heads, seq, head_dim]
    of this dtype. A stored file of any other shape is a miss."""

    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype


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


def hmac_json(secret: bytes, obj: object) -> str:
    """HMAC-SHA256 hex, keyed by `secret`, of the canonical JSON of `obj` (see `sha256_json`)."""
    return hmac.new(secret, sha256_json(obj).encode(), hashlib.sha256).hexdigest()


class DiskStore(FileBacked):
    """`KVStates` on disk under `root`, keyed by `states_key` hex keys. Thread-safe.

    `path`, `delete`, `in`, `keys`, `nbytes`, `write_failures` and `read_failures` come from `FileBacked`.

    Args:
        root: directory of the store (created if missing); the engine's `store_dir`.

    Raises:
        StoreError: `root` is empty or cannot be used as a directory.
    """

    def __init__(self, root: str | os.PathLike):
        self.files = FileStore(root, SUFFIX, argument="store_dir")

    def save(self, key: str, states: KVStates, meta: Mapping[str, str] | None = None) -> bool:
        """Write `states` under `key` atomically, replacing any previous file.

        Returns:
            True when written; False when the write failed (logged and counted in `write_failures`).

        Raises:
            StoreError: a bad key or meta (a caller's bug, not a disk problem).
        """
        check_key(key)
        meta = dict(meta or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise StoreError(f"meta must map str to str, got {meta!r}")
        tensors = _to_tensors(states)
        header = {"format": FORMAT, "version": VERSION, "key": key, "num_layers": str(states.num_layers),
                  "meta": json.dumps(meta, sort_keys=True)}
        header["checksum"] = _checksum(tensors, header, self.files.secret)
        return self.files.write(key, safetensors_save(tensors, metadata=header))

    def load(self, key: str, device: torch.device | str = "cpu", expect: StatesShape | None = None,
             ) -> KVStates | None:
        """The states saved under `key`, in memory this process owns, or None when absent or unreadable.

        A corrupt file (a bad checksum, a non-finite value, or states not of the `expect`ed shape) is
        deleted (logged, counted in `read_failures`); anything but a regular file at the key's path is
        left alone and is a miss too.
        """
        f = self.files.open(key)
        if f is None:
            return None
        with f:
            try:
                states = _read(f, key, self.files.secret, expect)
            except Exception as e:  # noqa: BLE001 - any failure means "re-encode", never a crash
                self.files.discard(key, f, f"corrupt KV file: {e}")
                return None
        return states if torch.device(device).type == "cpu" else states.to(device)

    def meta(self, key: str) -> dict[str, str] | None:
        """The caller's meta saved with `key` (unverified header read), or None when absent or unreadable."""
        f = self.files.open(key)
        if f is None:
            return None
        with f:
            try:
                return json.loads(_read_header(f)[0]["meta"])
            except Exception:  # noqa: BLE001 - load() does the full verification and cleanup
                return None


def _to_tensors(states: KVStates) -> dict[str, torch.Tensor]:
    def cpu(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu").contiguous()

    tensors = {f"k.{i}": cpu(k) for i, k in enumerate(states.keys)}
    tensors |= {f"v.{i}": cpu(v) for i, v in enumerate(states.values)}
    tensors["positions"] = cpu(states.positions).to(torch.int64)
    tensors["token_ids"] = torch.tensor(states.token_ids, dtype=torch.int64)
    return tensors


def _checksum(tensors: Mapping[str, torch.Tensor], header: Mapping[str, str], secret: bytes) -> str:
    h = hmac.new(secret, sha256_json({k: header.get(k) for k in _HEADER_FIELDS}).encode(), hashlib.sha256)
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the bytes, without a copy
    return h.hexdigest()


def _read(f: BinaryIO, key: str, secret: bytes, expect: StatesShape | None) -> KVStates:
    """Parse and verify one file into owned tensors; raises (anything) on any mismatch."""
    header, entries, base = _read_header(f)
    if (header.get("format"), header.get("version")) != (FORMAT, VERSION):
        raise StoreError(f"unknown format {header.get('format')!r} version {header.get('version')!r}")
    if header.get("key") != key:
        raise StoreError(f"file holds key {header.get('key')!r}, not {key!r}")
    layers = int(header["num_layers"])
    names = {f"{kv}.{i}" for kv in "kv" for i in range(max(layers, 0))} | {"positions", "token_ids"}
    if layers <= 0 or set(entries) != names:
        raise StoreError(f"tensors {sorted(entries)} do not match {layers} layers")
    tensors = _read_tensors(f, entries, base)
    _check_shapes(tensors, layers)
    if not hmac.compare_digest(_checksum(tensors, header, secret), str(header.get("checksum"))):
        raise StoreError("checksum mismatch (corrupt, edited, or written by another store)")
    if expect is not None:
        _check_expected(tensors, layers, expect)
    for i in range(layers):
        if not (torch.isfinite(tensors[f"k.{i}"]).all() and torch.isfinite(tensors[f"v.{i}"]).all()):
            raise StoreError(f"layer {i} holds non-finite values")
    return KVStates(tuple(tensors["token_ids"].tolist()), tensors["positions"],
                    tuple(tensors[f"k.{i}"] for i in range(layers)),
                    tuple(tensors[f"v.{i}"] for i in range(layers)))


def _read_header(f: BinaryIO) -> tuple[dict[str, str], dict[str, dict], int]:
    """A safetensors header: (metadata, tensor entries, offset of the data); raises on anything malformed."""
    n = int.from_bytes(_read_exact(f, 8), "little")
    if n > _MAX_HEADER:
        raise StoreError(f"header of {n} bytes")
    entries = json.loads(_read_exact(f, n))
    meta = entries.pop("__metadata__", None) or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise StoreError("malformed metadata")
    return meta, entries, 8 + n


def _read_tensors(f: BinaryIO, entries: Mapping[str, dict], base: int) -> dict[str, torch.Tensor]:
    """Read every tensor into memory this process owns: one allocation each, filled from the file.

    The data must be the tensors back to back in offset order and nothing else, so that a forged header
    can never make this allocate more than the file holds.
    """
    size = os.fstat(f.fileno()).st_size
    tensors, at = {}, 0
    for name, entry in sorted(entries.items(), key=lambda item: item[1]["data_offsets"][0]):
        dtype = _DTYPES[entry["dtype"]]
        shape = [int(d) for d in entry["shape"]]
        begin, end = (int(x) for x in entry["data_offsets"])
        nbytes = math.prod(shape) * dtype.itemsize
        if begin != at or end - begin != nbytes or base + end > size or min(shape, default=0) < 0:
            raise StoreError(f"tensor {name} has offsets {begin}..{end} for {nbytes} bytes")
        buf = torch.empty(nbytes, dtype=torch.uint8)
        f.seek(base + begin)
        if nbytes and f.readinto(buf.numpy()) != nbytes:
            raise StoreError(f"tensor {name} is cut short")
        tensors[name], at = buf.view(dtype).reshape(shape), end
    if base + at != size:
        raise StoreError(f"{size - base - at} stray bytes after the tensors")
    return tensors


def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise StoreError(f"file cut short: {len(data)} of {n} bytes")
    return data


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


def _check_expected(tensors: Mapping[str, torch.Tensor], layers: int, expect: StatesShape) -> None:
    if layers != expect.num_layers:
        raise StoreError(f"{layers} layers, not {expect.num_layers}")
    for i in range(layers):
        for t in (tensors[f"k.{i}"], tensors[f"v.{i}"]):
            if (t.shape[1], t.shape[3], t.dtype) != (expect.kv_heads, expect.head_dim, expect.dtype):
                raise StoreError(f"layer {i} tensor has shape {tuple(t.shape)} / {t.dtype}, not "
                                 f"[1, {expect.kv_heads}, seq, {expect.head_dim}] / {expect.dtype}")


def _jsonable(value: object) -> object:
    if isinstance(value, (torch.dtype, torch.device, os.PathLike)):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise PromptCacheError(f"cannot build a stable key from {type(value).__name__} value {value!r}")
