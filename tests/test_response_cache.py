"""Response cache: request keys, determinism, atomic JSON entries, corruption and TTL."""

from __future__ import annotations

import os

import pytest

from promptcache.errors import PromptCacheError, StoreError
from promptcache.response_cache import ResponseCache, is_deterministic, request_key

PARAMS = {"temperature": 0, "max_new_tokens": 32}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def key(**overrides) -> str:
    args = {"model_id": "tiny-llama", "prompt": "Hello  world", "params": PARAMS, "namespace": ""}
    return request_key(**(args | overrides))


def test_whitespace_is_normalised():
    assert key(prompt="Hello world") == key(prompt="  Hello \n\t world ") == key()
    chat = [{"role": "user", "content": "What is\n\n2+2?"}]
    same = [{"role": "user", "content": "  What is 2+2? "}]
    assert key(prompt=chat) == key(prompt=same)
    parts = [{"role": "user", "content": [{"type": "text", "text": "a   b"}]}]
    assert key(prompt=parts) == key(prompt=[{"role": "user", "content": [{"type": "text", "text": "a b"}]}])


@pytest.mark.parametrize("overrides", [
    {"prompt": "Hello world!"},
    {"prompt": [{"role": "user", "content": "Hello world"}]},
    {"model_id": "other-model"},
    {"namespace": "tenant-b"},
    {"params": PARAMS | {"max_new_tokens": 33}},
    {"params": PARAMS | {"stop": ["\n"]}},
])
def test_different_requests_have_different_keys(overrides):
    assert key(**overrides) != key()


def test_key_is_stable_and_hex():
    k = key(params={"max_new_tokens": 32, "temperature": 0})  # dict order does not matter
    assert k == key() and len(k) == 64 and int(k, 16) >= 0
    with pytest.raises(PromptCacheError):
        key(params={"temperature": object()})


@pytest.mark.parametrize("params, expected", [
    ({}, True),
    ({"temperature": 0}, True),
    ({"temperature": 0.0, "top_p": 0.9}, True),
    ({"temperature": None}, True),
    ({"do_sample": False, "temperature": 0.8}, True),
    ({"temperature": 0.7}, False),
    ({"do_sample": True}, False),
    ({"temperature": 0.7, "seed": 1234}, True),
    ({"do_sample": True, "seed": 0}, True),
    ({"temperature": 1.0, "top_k": 1}, True),
])
def test_is_deterministic(params, expected):
    assert is_deterministic(params) is expected


def test_put_get_round_trip_and_atomic(tmp_path):
    cache = ResponseCache(tmp_path)
    k = key()
    assert cache.get(k) is None
    payload = {"text": "Hi there", "token_ids": [1, 2, 3], "usage": {"prompt_tokens": 4}}
    cache.put(k, payload)
    assert cache.get(k) == payload
    cache.put(k, {"text": "replaced"})
    assert cache.get(k) == {"text": "replaced"}
    files = [p.name for p in tmp_path.rglob("*")]
    assert files == [k[:2], k + ".json"]  # no temp files left behind
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
    with pytest.raises(PromptCacheError):
        cache.put(key(), {"x": object()})
    with pytest.raises(StoreError):
        ResponseCache(tmp_path, ttl_s=0)
