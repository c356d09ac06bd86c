"""Cache management over HTTP (`caching.CacheAdmin`): warm, list, pin/unpin, release, evict.

    POST   /v1/cache/warm                           {"messages" | "prompt", "ttl", "cache_salt"}
    GET    /v1/cache[?cache_salt=]                  schemas' modules, kept prefixes, prefix-tree totals
    POST   /v1/cache/prefixes/{key}/pin | /unpin    DELETE /v1/cache/prefixes/{key} (stop keeping it)
    POST   /v1/schemas/{name}/modules/pin | /unpin  {"module": path}
    POST   /v1/cache/evict                          {"bytes": n}: free prefix-tree bytes now (LRU)
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import Field

from .app import service_of
from .caching import CacheAdmin
from .errors import bad_field
from .jsonbody import SafeRoute
from .protocol import Body, ChatMessage, chat_messages

router = APIRouter(route_class=SafeRoute, prefix="/v1")


class WarmBody(Body):
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    prompt: str | None = None
    ttl: Literal["5m", "1h"] | None = "5m"
    cache_salt: str | None = Field(None, max_length=256)


class PinBody(Body):
    ttl: Literal["5m", "1h"] = "5m"  # unpinning: how long the prefix stays kept


class ModuleBody(Body):
    module: str


class EvictBody(Body):
    bytes: int = Field(ge=0, le=1 << 62)


def admin(request: Request) -> CacheAdmin:
    return service_of(request).cache_admin


@router.post("/cache/warm", summary="Prefill a prompt or chat without answering, and keep its states")
async def warm(request: Request, body: WarmBody) -> dict:
    if (body.messages is None) == (body.prompt is None):
        raise bad_field("messages", "give exactly one of messages (a chat) or prompt (plain text)")
    if body.messages is not None:
        from .protocol import ChatBody

        prompt, _ = chat_messages(ChatBody(model="", messages=body.messages))
    else:
        prompt = body.prompt
    return await run_in_threadpool(admin(request).warm, prompt, body.ttl, body.cache_salt or "")


@router.get("/cache", summary="What is cached: modules, kept prefixes, prefix-tree totals")
async def listing(request: Request, cache_salt: str | None = None) -> dict:
    return admin(request).listing(cache_salt)


@router.post("/cache/prefixes/{key}/pin", summary="Keep a prefix until unpinned")
async def pin_prefix(request: Request, key: str) -> dict:
    return admin(request).pin_prefix(key, True, "5m")


@router.post("/cache/prefixes/{key}/unpin", summary="Let a pinned prefix expire after its TTL")
async def unpin_prefix(request: Request, key: str, body: PinBody | None = None) -> dict:
    return admin(request).pin_prefix(key, False, (body or PinBody()).ttl)


@router.delete("/cache/prefixes/{key}", summary="Stop keeping a prefix (it becomes evictable)")
async def release_prefix(request: Request, key: str) -> dict:
    return admin(request).release_prefix(key)


@router.post("/schemas/{name}/modules/pin", summary="Pin a module's states in memory (encodes it if needed)")
async def pin_module(request: Request, name: str, body: ModuleBody) -> dict:
    return await run_in_threadpool(admin(request).pin_module, name, body.module, True)


@router.post("/schemas/{name}/modules/unpin")
async def unpin_module(request: Request, name: str, body: ModuleBody) -> dict:
    return await run_in_threadpool(admin(request).pin_module, name, body.module, False)


@router.post("/cache/evict", summary="Free prefix-tree bytes now, least recently used first")
async def evict(request: Request, body: EvictBody) -> dict:
    return admin(request).evict(body.bytes)
