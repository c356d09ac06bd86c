"""Response cache: whole completions of repeated deterministic requests, as JSON files (off by default).

The engine keys an entry on everything its answer depends on (the model's identity, the exact token
ids fed and how, the sampling parameters, the namespace) and caches only deterministic requests
(`SamplingParams.deterministic`): a sampled completion replayed from the cache would silently remove
the randomness the caller asked for.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import time
from collections.abc import Callable

from promptcache.errors import PromptCacheError, StoreError
from promptcache.kv.disk import hmac_json
from promptcache.kv.files import FileBacked, FileStore, check_key

logger = logging.getLogger(__name__)

VERSION = 3  # 2: entries carry a sha256; 3: an HMAC keyed by the cache's secret instead (`kv.files`)
SUFFIX = ".json"


class ResponseCache(FileBacked):
    """Completion payloads on disk under `root`, one JSON file per key. Thread-safe.

    `path`, `delete`, `in`, `keys`, `nbytes`, `write_failures` and `read_failures` come from `FileBacked`.

    An entry is `{"version", "key", "created", "payload", "hmac"}`, an HMAC-SHA256 keyed by the cache's
    secret (`kv.files.store_secret`) over the canonical JSON of the rest: a corrupt or hand-edited entry,
    one of another version or key, or one `created` in the future (a clock set back, or an edit meant to
    make it immortal) is a miss, and its file is removed.
    Only regular files are read (see `kv.files`). A failed `put` is logged and counted, never raised.

    Args:
        root: directory of the cache (created if missing); the engine's `response_cache_dir`.
        ttl_s: seconds after `put` when an entry expires, or None for never.
        clock: wall-clock seconds (injectable for tests); wall time because entries outlive the process.

    Raises:
        StoreError: a bad `ttl_s`, or `root` is empty or cannot be used as a directory.
    """

    def __init__(self, root: str | os.PathLike, ttl_s: float | None = None,
                 clock: Callable[[], float] = time.time):
        if ttl_s is not None and ttl_s <= 0:
            raise StoreError(f"ttl_s must be > 0 or None, got {ttl_s!r}")
        self.files = FileStore(root, SUFFIX, argument="response_cache_dir")
        self.ttl_s = ttl_s
        self._clock = clock

    def get(self, key: str) -> dict | None:
        """The payload stored under `key`; None when absent, expired or bad (those files are removed)."""
        f = self.files.open(key)
        if f is None:
            return None
        with f:
            try:
                payload, created = _unpack(json.loads(f.read().decode("utf-8")), key, self.files.secret)
            except Exception as e:  # noqa: BLE001 - a bad file is a miss, never a crash
                self.files.discard(key, f, f"corrupt response cache entry: {e}")
                return None
            age = self._clock() - created
            if age < 0:
                self.files.discard(key, f, f"entry created {-age:.0f} s in the future")
                return None
            if self.ttl_s is not None and age > self.ttl_s:
                self.files.discard(key, f, "expired")
                return None
        return payload

    def put(self, key: str, payload: dict) -> bool:
        """Store `payload` (JSON-serialisable) under `key`, atomically replacing any previous entry.

        Returns:
            True when stored; False when it could not be (not JSON-serialisable, full or read-only disk),
            logged and counted in `write_failures`: the answer being served is never lost to the cache.

        Raises:
            StoreError: a malformed key.
        """
        check_key(key)
        record = {"version": VERSION, "key": key, "created": self._clock(), "payload": payload}
        try:
            record["hmac"] = hmac_json(self.files.secret, record)
            data = json.dumps(record, ensure_ascii=False, allow_nan=False).encode("utf-8")
        except (PromptCacheError, TypeError, ValueError) as e:  # UnicodeEncodeError is a ValueError
            self.files.write_failed(key, f"the payload is not JSON-serialisable: {e}")
            return False
        return self.files.write(key, data)


def _unpack(record: object, key: str, secret: bytes) -> tuple[dict, float]:
    if not isinstance(record, dict) or record.get("version") != VERSION or record.get("key") != key:
        raise StoreError("not a response cache record for this key")
    digest = record.pop("hmac", None)
    if not isinstance(digest, str) or not hmac.compare_digest(digest, hmac_json(secret, record)):
        raise StoreError("checksum mismatch")
    payload, created = record.get("payload"), record.get("created")
    if not isinstance(payload, dict) or isinstance(created, bool) or not isinstance(created, (int, float)):
        raise StoreError("malformed response cache record")
    return payload, float(created)
