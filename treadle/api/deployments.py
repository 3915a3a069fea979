"""The deployment, trace and feedback routes: `/api/v1/deployments…`, `/api/v1/traces…` and `POST /v1/feedback`.

Thin: authenticate (the Tinker API keys, as `X-API-Key` or `Authorization: Bearer`), decode, call the service
(reads off the event loop; create/promote/rollback are async and await the adapter load on its worker), encode.
Everything is owner-scoped: another owner's deployment, trace or completion is a 404. Errors are JSON `{"detail": ...}` naming the field.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from treadle.api.decoding import INT64_MAX, INT64_MIN
from treadle.errors import UserError
from treadle.service.deployments import Deployments
from treadle.service.traces import TraceFilter

T = TypeVar("T")
_LIST_PARAMS = ("deployment", "version", "after_seq", "has_feedback", "session_id", "limit")


def owner_of(deployments: Deployments, request: Request) -> str:
    key = request.headers.get("x-api-key")
    if not key:
        scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
        key = token.strip() if scheme.lower() == "bearer" else None
    return deployments.auth.owner(key)


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw) if raw else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError("body: must be valid JSON", field="body") from None
    if not isinstance(body, dict):
        raise UserError("body: must be a JSON object", field="body")
    return body


def _only(body: dict[str, Any], allowed: tuple[str, ...]) -> None:
    for k in body:
        if k not in allowed:
            raise UserError(f"{k}: unknown field; allowed: {', '.join(allowed)}", field=str(k))


def _int_param(request: Request, name: str, default: int | None) -> int | None:
    v = request.query_params.get(name)
    if v is None:
        return default
    try:
        n = int(v)
    except ValueError:
        raise UserError(f"{name}: must be an integer, got {v!r}", field=name) from None
    if not INT64_MIN <= n <= INT64_MAX:  # the store's integers are int64
        raise UserError(f"{name}: must fit in 64 bits, got {v[:40]!r}", field=name)
    return n


def _bool_param(request: Request, name: str) -> bool | None:
    v = request.query_params.get(name)
    if v is None:
        return None
    if v.lower() not in ("true", "false"):
        raise UserError(f"{name}: must be true or false, got {v!r}", field=name)
    return v.lower() == "true"


def trace_filter(deployments: Deployments, owner: str, request: Request) -> TraceFilter:
    for k in request.query_params:
        if k not in _LIST_PARAMS:
            raise UserError(f"{k}: unknown query parameter; allowed: {', '.join(_LIST_PARAMS)}", field=k)
    name = request.query_params.get("deployment")
    if name is not None:
        deployments.get(owner, name)  # 404 listing the caller's deployments
    return TraceFilter(
        owner=owner,
        deployment=name,
        version=_int_param(request, "version", None),
        after_seq=_int_param(request, "after_seq", 0) or 0,
        has_feedback=_bool_param(request, "has_feedback"),
        session_id=request.query_params.get("session_id"),
        limit=_int_param(request, "limit", 100) or 0,
    )


async def _call(fn: Callable[[], T]) -> T:
    return await asyncio.to_thread(fn)


def make_router(deployments: Deployments) -> APIRouter:
    r = APIRouter(tags=["deployments"])
    d = deployments

    @r.post("/api/v1/deployments")
    async def create(request: Request) -> JSONResponse:
        who, body = owner_of(d, request), await _body(request)
        _only(body, ("name", "model_path"))
        out = await d.create(who, body.get("name"), body.get("model_path"))
        return JSONResponse(out, status_code=201)

    @r.get("/api/v1/deployments")
    async def list_all(request: Request) -> dict[str, Any]:
        who = owner_of(d, request)
        return await _call(lambda: d.list_all(who))

    @r.get("/api/v1/deployments/{name}")
    async def get(name: str, request: Request) -> dict[str, Any]:
        who = owner_of(d, request)
        return await _call(lambda: d.get(who, name))

    @r.post("/api/v1/deployments/{name}/promote")
    async def promote(name: str, request: Request) -> dict[str, Any]:
        who, body = owner_of(d, request), await _body(request)
        _only(body, ("model_path", "reason"))
        return await d.promote(who, name, body.get("model_path"), body.get("reason"))

    @r.post("/api/v1/deployments/{name}/rollback")
    async def rollback(name: str, request: Request) -> dict[str, Any]:
        who, body = owner_of(d, request), await _body(request)
        _only(body, ("version", "reason"))
        return await d.rollback(who, name, body.get("version"), body.get("reason"))

    @r.delete("/api/v1/deployments/{name}/traces")
    async def delete_traces(name: str, request: Request) -> dict[str, Any]:
        who = owner_of(d, request)

        def delete() -> dict[str, Any]:
            d.get(who, name)
            return {"deleted": d.traces.delete(who, name)}

        return await _call(delete)

    @r.get("/api/v1/traces")
    async def list_traces(request: Request) -> dict[str, Any]:
        who = owner_of(d, request)
        return await _call(lambda: d.traces.query(trace_filter(d, who, request)))

    @r.get("/api/v1/traces/{completion_id}")
    async def get_trace(completion_id: str, request: Request) -> dict[str, Any]:
        who = owner_of(d, request)
        return await _call(lambda: d.traces.get(who, completion_id))

    @r.post("/v1/feedback")
    async def feedback(request: Request) -> JSONResponse:
        who, body = owner_of(d, request), await _body(request)
        out, created = await _call(lambda: d.traces.add_feedback(who, body))
        return JSONResponse(out, status_code=201 if created else 200)

    return r
