"""Response cache: whole completions of repeated deterministic requests, as JSON files (off by default).

Only requests for which `is_deterministic` holds should be cached: a sampled completion replayed from
the cache would silently remove the randomness the caller asked for.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from promptcache.errors import PromptCacheError, StoreError
from promptcache.kv.disk import sha256_json
from promptcache.kv.files import atomic_write, check_key

logger = logging.getLogger(__name__)

VERSION = 1
SUFFIX = ".json"


def request_key(*, model_id: str, prompt: str | list, params: Mapping[str, object],
                namespace: str = "") -> str:
    """A stable sha256 hex key of one request.

    Strings in `prompt` (a text, or chat messages and their contents) are whitespace-normalised: runs of
    whitespace become one space and the ends are stripped. `params` are taken verbatim (a stop string's
    whitespace matters).

    NOTE: prompts differing only in whitespace share a key, hence a cached completion, by design.

    Raises:
        PromptCacheError: a prompt or parameter value that JSON cannot represent.
    """
    return sha256_json({"kind": "promptcache.response", "model_id": model_id,
                         "prompt": _normalise(prompt), "params": dict(params), "namespace": namespace})


def is_deterministic(params: Mapping[str, object]) -> bool:
    """Whether a request always yields the same completion, i.e. may be served from the cache.

    True when a fixed `seed` is given, or sampling is off: `do_sample` is False, or (with `do_sample`
    unset) `temperature` is None or 0, or `top_k` is 1.
    """
    if params.get("seed") is not None or params.get("do_sample") is False:
        return True
    if params.get("do_sample") is True:
        return params.get("top_k") == 1
    temperature = params.get("temperature")
    return temperature is None or float(temperature) == 0.0 or params.get("top_k") == 1


class ResponseCache:
    """Completion payloads on disk under `root`, one JSON file per `request_key`. Thread-safe.

    Args:
        root: directory of the cache (created if missing).
        ttl_s: seconds after `put` when an entry expires, or None for never.
        clock: wall-clock seconds (injectable for tests); wall time because entries outlive the process.
    """

    def __init__(self, root: str | os.PathLike, ttl_s: float | None = None,
                 clock: Callable[[], float] = time.time):
        if ttl_s is not None and ttl_s <= 0:
            raise StoreError(f"ttl_s must be > 0 or None, got {ttl_s!r}")
        self.root = Path(root)
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.RLock()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot use {self.root} as a cache directory: {e}") from e

    def get(self, key: str) -> dict | None:
        """The payload stored under `key`; None when absent, expired or corrupt (those files are removed)."""
        path = self._path(key)
        with self._lock:
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
                payload, created = _unpack(record, key)
            except FileNotFoundError:
                return None
            except Exception as e:  # noqa: BLE001 - a bad file is a miss, never a crash
                logger.warning("discarding corrupt response cache file %s: %s", path, e)
                path.unlink(missing_ok=True)
                return None
            if self.ttl_s is not None and self._clock() - created > self.ttl_s:
                path.unlink(missing_ok=True)
                return None
            return payload

    def put(self, key: str, payload: dict) -> None:
        """Store `payload` (JSON-serialisable) under `key`, atomically replacing any previous entry."""
        path = self._path(key)
        record = {"version": VERSION, "key": key, "created": self._clock(), "payload": payload}
        try:
            data = json.dumps(record, ensure_ascii=False, allow_nan=False).encode("utf-8")
        except (TypeError, ValueError) as e:
            raise PromptCacheError(f"response payload is not JSON-serialisable: {e}") from e
        with self._lock:
            atomic_write(path, data)

    def delete(self, key: str) -> bool:
        """Remove `key`'s entry; returns whether there was one."""
        path = self._path(key)
        with self._lock:
            existed = path.exists()
            path.unlink(missing_ok=True)
            return existed

    def _path(self, key: str) -> Path:
        check_key(key)
        return self.root / key[:2] / (key + SUFFIX)


def _unpack(record: object, key: str) -> tuple[dict, float]:
    if not isinstance(record, dict) or record.get("version") != VERSION or record.get("key") != key:
        raise StoreError("not a response cache record for this key")
    payload, created = record.get("payload"), record.get("created")
    if not isinstance(payload, dict) or not isinstance(created, (int, float)):
        raise StoreError("malformed response cache record")
    return payload, float(created)


def _normalise(value: object) -> object:
    if isinstance(value, str):
        return " ".join(value.split())
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _normalise(v) for k, v in value.items()}
    return value
