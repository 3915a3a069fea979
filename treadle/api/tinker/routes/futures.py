"""Futures (protocol §4): long-poll one request's result, list a sampling session's completed requests, and
cancel a request.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from treadle.api.tinker.codec import is_heavy, to_wire
from treadle.api.tinker.routes.wire import Fields, fields, owner
from treadle.errors import UserError
from treadle.service.tinker_service import TinkerService

log = logging.getLogger(__name__)


def add_routes(r: APIRouter, service: TinkerService) -> None:
    @r.post("/retrieve_future")
    async def retrieve_future(request: Request) -> Response:
        who, f = owner(service, request), await fields(request)
        rid = f.get("request_id", str)
        outcome = await service.requests.retrieve(who, rid)
        if outcome is None:
            # 408 makes the SDK re-poll at once (protocol §4.2); a sample queued for sampling tokens says so,
            # and why, in the fields the SDK hands its QueueStateObserver.
            reason = service.requests.queue_reason(who, rid)
            body: dict[str, Any] = {"detail": "pending", "request_id": rid, "queue_state": "active"}
            if reason is not None:
                body.update(queue_state="paused_capacity", queue_state_reason=reason)
            return JSONResponse(body, status_code=408)
        if outcome.error is not None:
            return JSONResponse({"error": outcome.error, "category": outcome.category or "unknown"})
        if outcome.result is None:
            return JSONResponse({})
        result = outcome.result
        try:
            wire = await asyncio.to_thread(to_wire, result) if is_heavy(result) else to_wire(result)
        except Exception as e:  # an encoding bug fails this future with a server error, not a retried 500
            log.exception("encoding the result of %s failed", rid)
            return JSONResponse({"error": f"internal error encoding the result: {e}", "category": "server"})
        if isinstance(wire, bytes):
            return Response(wire, media_type="application/x-protobuf")
        return JSONResponse(wire)

    @r.post("/retrieve_futures")
    async def retrieve_futures(request: Request) -> dict[str, Any]:
        who, f = owner(service, request), await fields(request)
        target = Fields(f.get("target", dict))
        if target.get("type", str, "sampling_session") != "sampling_session":
            raise UserError("target.type: only 'sampling_session' is supported", field="target.type")
        done, cursor = await service.sampling.retrieve_futures(
            who,
            target.get("sampling_session_id", str),
            f.get("prev_cursor", int, 0),
            f.get("timeout", float, 30.0),
        )
        return {"completions": [{"state": st, "request_id": rid} for rid, st in done], "cursor": cursor}

    @r.post("/cancel_future")
    async def cancel_future(request: Request) -> dict[str, Any]:
        who, f = owner(service, request), await fields(request)
        # Protocol §4.3: the SDK ignores the answer; sampling requests stop generating, others complete.
        return {"cancelled": service.requests.cancel(who, f.get("request_id", str))}
