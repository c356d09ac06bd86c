"""Routes every API shares: health, metrics, models and PML schemas."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, PlainTextResponse, Response

from .app import authorized, loading_error, service_of
from .errors import ApiError
from .jsonbody import SafeRoute

router = APIRouter(route_class=SafeRoute)


@router.get("/health", summary="Alive without the key; with it: requests, cache and store details")
async def health(request: Request) -> Response:
    startup = request.app.state.startup
    if startup.service is None:
        error = loading_error(startup)
        return JSONResponse({"status": "failed" if startup.failed else "loading", "progress": startup.progress,
                             "detail": error.message}, 503, error.headers)
    if not authorized(request.scope, startup.config.api_key):
        return JSONResponse({"status": "shutting_down" if startup.service.gate.closed else "ok"})
    return JSONResponse(startup.service.health())


@router.get("/metrics", summary="Prometheus text", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    return PlainTextResponse(service_of(request).metrics_text(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/models", summary="The one model served")
async def models(request: Request) -> dict:
    return service_of(request).models()


@router.get("/v1/models/{model_id}")
async def model(request: Request, model_id: str) -> dict:
    return service_of(request).model(model_id)


@router.get("/v1/schemas", summary="The PML schemas added")
async def schemas(request: Request) -> dict:
    return service_of(request).schemas()


@router.post("/v1/schemas", summary="Add a PML <schema> (the body is its XML text); encodes its modules",
             openapi_extra={"requestBody": {"content": {"application/xml": {"schema": {"type": "string"}}},
                                            "required": True}})
async def add_schema(request: Request) -> dict:
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the body is not UTF-8 (byte {e.start})", param="body") from None
    return await run_in_threadpool(service_of(request).add_schema, text)


@router.get("/v1/schemas/{name}")
async def schema(request: Request, name: str) -> dict:
    return service_of(request).schema(name)


@router.delete("/v1/schemas/{name}")
async def delete_schema(request: Request, name: str) -> dict:
    return service_of(request).delete_schema(name)
