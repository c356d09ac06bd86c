"""Cache management over HTTP: warm a chat or a prompt without answering, list what is cached, pin and
unpin prefixes and modules, release, evict; tenants never read each other's prefixes."""

from __future__ import annotations

import uuid

import pytest

from .conftest import ROOT, served

SYSTEM = "You are a weather assistant who answers in a long and careful way. " * 8
CHAT = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Rain?"}]


@pytest.fixture(scope="module")
def server():
    yield from served("--model", "tiny")


def chat(server, messages, salt):
    body = {"model": "tiny", "messages": messages, "max_tokens": 2, "temperature": 0, "cache_salt": salt}
    return server.request("POST", "/v1/chat/completions", body).json()["usage"]


def listing(server, salt=None):
    return server.request("GET", "/v1/cache" + (f"?cache_salt={salt}" if salt else "")).json()


def test_warm_a_chat_then_the_request_reads_it(server):
    salt = uuid.uuid4().hex
    warmed = server.request("POST", "/v1/cache/warm", {"messages": CHAT[:1], "cache_salt": salt, "ttl": "1h"})
    assert warmed.status == 200, warmed.body
    w = warmed.json()
    assert w["cache_write_tokens"] == w["prompt_tokens"] > 100 and w["kept_tokens"] > 100
    assert w["prefix"]["ttl_s"] == 3600 and not w["prefix"]["pinned"]
    usage = chat(server, CHAT, salt)
    assert usage["prompt_tokens_details"]["cached_tokens"] >= w["kept_tokens"] - 5  # the system turn's markers
    [entry] = listing(server, salt)["prefixes"]
    assert entry["key"] == w["prefix"]["key"] and entry["tokens"] == w["kept_tokens"] and entry["bytes"] > 0
    assert 3590 < entry["expires_in_s"] <= 3600


def test_tenants_never_read_each_other(server):
    a, b = uuid.uuid4().hex, uuid.uuid4().hex
    server.request("POST", "/v1/cache/warm", {"messages": CHAT[:1], "cache_salt": a})
    assert chat(server, CHAT, b)["prompt_tokens_details"]["cached_tokens"] == 0
    assert chat(server, CHAT, a)["prompt_tokens_details"]["cached_tokens"] > 100
    assert listing(server, b)["prefixes"] == []
    assert len(listing(server, a)["prefixes"]) == 1


def test_pin_unpin_release_and_evict(server):
    salt = uuid.uuid4().hex
    key = server.request("POST", "/v1/cache/warm", {"prompt": "A plain prompt to keep. " * 20,
                                                    "cache_salt": salt}).json()["prefix"]["key"]
    pinned = server.request("POST", f"/v1/cache/prefixes/{key}/pin").json()
    assert pinned == {"key": key, "pinned": True, "expires_in_s": None}
    assert server.request("POST", "/v1/cache/evict", {"bytes": 1 << 40}).status == 200
    assert listing(server, salt)["prefixes"][0]["pinned"]
    unpinned = server.request("POST", f"/v1/cache/prefixes/{key}/unpin", {"ttl": "5m"}).json()
    assert not unpinned["pinned"] and 290 < unpinned["expires_in_s"] <= 300
    assert server.request("DELETE", f"/v1/cache/prefixes/{key}").json()["released"] is True
    assert listing(server, salt)["prefixes"] == []
    evicted = server.request("POST", "/v1/cache/evict", {"bytes": 1 << 40}).json()
    assert evicted["prefix_tree_bytes"] <= listing(server)["prefix_tree"]["bytes"]
    missing = server.request("DELETE", f"/v1/cache/prefixes/{key}")
    assert missing.status == 404 and "no kept prefix" in missing.json()["error"]["message"]


def test_modules_are_listed_and_pinned(server):
    persona = (ROOT / "schemas" / "persona.xml").read_text()
    assert server.request("POST", "/v1/schemas", persona).status == 200
    pinned = server.request("POST", "/v1/schemas/persona/modules/pin", {"module": "age-60s"}).json()
    assert pinned["pinned"] and pinned["tier"] in ("device", "host")
    [schema] = [s for s in listing(server)["schemas"] if s["id"] == "persona"]
    modules = {m["name"]: m for m in schema["modules"]}
    assert modules["age-60s"]["pinned"] and modules["age-60s"]["bytes"] > 0 and modules["age-60s"]["tokens"] > 0
    server.request("POST", "/v1/schemas/persona/modules/unpin", {"module": "age-60s"})
    unknown = server.request("POST", "/v1/schemas/persona/modules/pin", {"module": "nope"})
    assert unknown.status == 400 and "nope" in unknown.json()["error"]["message"]


def test_warm_needs_exactly_one_of_messages_or_prompt(server):
    both = server.request("POST", "/v1/cache/warm", {"messages": CHAT, "prompt": "x"})
    assert both.status == 400 and both.json()["error"]["param"] == "messages"
    assert server.request("POST", "/v1/cache/warm", {"prompt": "x", "ttl": "2h"}).status == 400
