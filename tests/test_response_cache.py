"""Response cache: atomic JSON entries, integrity, odd files, failures, TTL."""

from __future__ import annotations

import errno
import json
import os

import pytest

from promptcache.errors import StoreError
from promptcache.kv.disk import hmac_json, sha256_json
from promptcache.response_cache import ResponseCache

from .kv.helpers import fifo_released, finishes

PARAMS = {"temperature": 0, "max_new_tokens": 32}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def key(**overrides) -> str:
    """An entry key as the engine makes one (a sha256 over what the answer depends on)."""
    return sha256_json({"model_id": "tiny-llama", "prompt": "Hello  world", "params": PARAMS} | overrides)


def test_put_get_round_trip_and_atomic(tmp_path):
    cache = ResponseCache(tmp_path)
    k = key()
    assert cache.get(k) is None
    payload = {"text": "Hi there", "token_ids": [1, 2, 3], "usage": {"prompt_tokens": 4}}
    cache.put(k, payload)
    assert cache.get(k) == payload
    cache.put(k, {"text": "replaced"})
    assert cache.get(k) == {"text": "replaced"}
    files = sorted(p.name for p in tmp_path.rglob("*"))
    assert files == sorted([".secret", k[:2], k + ".json"])  # no temp files left behind
    assert cache.delete(k) and not cache.delete(k) and cache.get(k) is None


def test_failed_write_keeps_old_entry(tmp_path, monkeypatch):
    cache = ResponseCache(tmp_path)
    k = key()
    cache.put(k, {"text": "old"})

    def die(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", die)
    with pytest.raises(KeyboardInterrupt):
        cache.put(k, {"text": "new"})
    monkeypatch.undo()
    assert cache.get(k) == {"text": "old"}
    assert sorted(p.name for p in (tmp_path / k[:2]).iterdir()) == [k + ".json"]


@pytest.mark.parametrize("content", [
    b"{not json", b"", b"[1, 2]", b'{"version": 1, "key": "x", "payload": {}}', b"\xff\xfe\x00garbage"])
def test_corrupt_entry_is_a_miss(tmp_path, content):
    cache = ResponseCache(tmp_path)
    k = key()
    cache.put(k, {"text": "ok"})
    path = tmp_path / k[:2] / (k + ".json")
    path.write_bytes(content)
    assert cache.get(k) is None
    assert not path.exists()


def test_ttl_expiry(tmp_path):
    clock = FakeClock()
    cache = ResponseCache(tmp_path, ttl_s=60, clock=clock)
    k = key()
    cache.put(k, {"text": "fresh"})
    clock.now += 59
    assert cache.get(k) == {"text": "fresh"}
    clock.now += 2
    assert cache.get(k) is None
    assert ResponseCache(tmp_path, clock=clock).get(k) is None  # expired entries are removed


def test_bad_input(tmp_path):
    cache = ResponseCache(tmp_path)
    with pytest.raises(StoreError):
        cache.get("../etc/passwd")
    with pytest.raises(StoreError):
        cache.put("../etc/passwd", {"text": "x"})
    with pytest.raises(StoreError):
        ResponseCache(tmp_path, ttl_s=0)


@pytest.mark.parametrize("payload", [{"x": object()}, {"x": float("nan")}, {"text": "\ud800"}])
def test_unserialisable_payload_is_not_stored_and_not_raised(tmp_path, payload, caplog):
    cache = ResponseCache(tmp_path)
    assert cache.put(key(), payload) is False
    assert cache.write_failures == 1 and "not JSON-serialisable" in caplog.text
    assert cache.get(key()) is None and [p.name for p in tmp_path.iterdir()] == [".secret"]


def entry_path(cache: ResponseCache, k: str):
    return cache.root / k[:2] / (k + ".json")


def edit(path, change) -> None:
    record = json.loads(path.read_text(encoding="utf-8"))
    change(record)
    path.write_text(json.dumps(record), encoding="utf-8")


EDITS = {
    "text": lambda r: r["payload"].update(text="a wrong answer"),
    "token_ids": lambda r: r["payload"].update(token_ids=[9, 9]),
    "payload_type": lambda r: r.update(payload=["not", "a", "dict"]),
    "created_older": lambda r: r.update(created=r["created"] - 10),
    "created_string": lambda r: r.update(created="1000"),
    "created_bool": lambda r: r.update(created=True),
    "no_hash": lambda r: r.pop("hmac"),
    "hash_type": lambda r: r.update(hmac=[1, 2]),
    "unkeyed_hash": lambda r: (r["payload"].update(text="a wrong answer"), r.pop("hmac"),
                               r.update(hmac=sha256_json(r))),  # an edit with a hash anyone can compute
    "version": lambda r: r.update(version=1),
    "key": lambda r: r.update(key="0" * 64),
}


@pytest.mark.parametrize("change", EDITS.values(), ids=EDITS.keys())
def test_hand_edited_entry_is_a_miss_and_removed(tmp_path, change, caplog):
    cache = ResponseCache(tmp_path)
    k = key()
    assert cache.put(k, {"text": "the answer", "token_ids": [1, 2], "usage": {"output_tokens": 2}})
    edit(entry_path(cache, k), change)
    assert cache.get(k) is None
    assert not entry_path(cache, k).exists() and cache.read_failures == 1 and "corrupt" in caplog.text


@pytest.mark.parametrize("change", [EDITS["payload_type"], EDITS["created_string"], EDITS["created_bool"]],
                         ids=["payload_type", "created_string", "created_bool"])
def test_well_hashed_but_malformed_entry_is_a_miss(tmp_path, change):
    cache = ResponseCache(tmp_path)
    k = key()
    cache.put(k, {"text": "the answer"})

    def forge(record):  # the edit, with its hash recomputed by someone who can read the cache's secret
        change(record)
        record.pop("hmac")
        record["hmac"] = hmac_json(cache.files.secret, record)

    edit(entry_path(cache, k), forge)
    assert cache.get(k) is None and cache.read_failures == 1


@pytest.mark.parametrize("ttl_s", [None, 60])
def test_entry_created_in_the_future_is_a_miss(tmp_path, ttl_s):
    clock = FakeClock()
    k = key()
    clock.now += 3600  # written by a clock an hour ahead (or edited, with a recomputed hash)
    assert ResponseCache(tmp_path, ttl_s=ttl_s, clock=clock).put(k, {"text": "from the future"})
    clock.now -= 3600
    cache = ResponseCache(tmp_path, ttl_s=ttl_s, clock=clock)
    assert cache.get(k) is None and k not in cache and cache.read_failures == 1


def test_write_at_the_same_time_is_not_the_future(tmp_path):
    clock = FakeClock()
    cache = ResponseCache(tmp_path, clock=clock)
    cache.put(key(), {"text": "now"})
    assert cache.get(key()) == {"text": "now"}


def _fifo(path):
    os.mkfifo(path)


def _directory(path):
    path.mkdir()
    (path / "x").write_text("x")


@pytest.mark.parametrize("make", [_fifo, _directory], ids=["fifo", "directory"])
def test_odd_file_at_the_key_path_is_a_miss_that_never_blocks(tmp_path, make):
    cache = ResponseCache(tmp_path)
    path = entry_path(cache, key())
    path.parent.mkdir()
    make(path)
    with fifo_released(path):
        assert finishes(lambda: cache.get(key())) is None
    assert cache.read_failures == 1 and os.path.lexists(path)
    if make is _directory:
        assert cache.put(key(), {"text": "x"}) is False and cache.write_failures == 1
        assert not cache.delete(key()) and path.is_dir()
    else:
        assert finishes(lambda: cache.put(key(), {"text": "x"})) is True
        assert cache.get(key()) == {"text": "x"}


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EROFS])
def test_full_or_read_only_disk_is_logged_counted_and_not_raised(tmp_path, monkeypatch, caplog, error):
    cache = ResponseCache(tmp_path)
    k = key()
    cache.put(k, {"text": "old"})

    def fail(*args, **kwargs):
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(os, "replace", fail)
    assert cache.put(k, {"text": "new"}) is False
    monkeypatch.undo()
    assert cache.write_failures == 1 and os.strerror(error) in caplog.text
    assert cache.get(k) == {"text": "old"}


@pytest.mark.parametrize("root", ["", " "])
def test_empty_response_cache_dir_is_refused(root):
    with pytest.raises(StoreError, match="response_cache_dir"):
        ResponseCache(root)
