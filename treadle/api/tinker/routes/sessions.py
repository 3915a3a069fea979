"""Client start-up, sessions and server identity (protocol §2, §3): config, create/heartbeat/finish/list
sessions, telemetry, health, capabilities and the API key's own record.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request

from treadle.api.tinker.routes.wire import fields, owner
from treadle.errors import UserError
from treadle.service.tinker_service import TinkerService


def add_routes(r: APIRouter, service: TinkerService) -> None:
    @r.post("/client/config")
    async def client_config(request: Request) -> dict[str, Any]:
        owner(service, request)
        # Plain httpx instead of pyqwest: simpler over plain HTTP and the SDK's own default for config.
        # zstd forward_backward bodies and server-side custom losses are both served (api/content_encoding,
        # service/custom_losses).
        return {
            "use_pyqwest_transport": False,
            "proto_compress_fwdbwd": True,
            "custom_loss_server_side": True,
            "pjwt_auth_enabled": False,
        }

    @r.post("/client/dynamic_config")
    async def dynamic_config(request: Request) -> dict[str, Any]:
        owner(service, request)
        return {"refresh_interval_sec": 300, "sample_cancel_enabled": False}

    @r.post("/create_session")
    async def create_session(request: Request) -> dict[str, Any]:
        who, f = owner(service, request), await fields(request)
        sid = service.sessions.create_session(who, f.get("tags", list, []), f.get("user_metadata", dict, {}))
        return {"session_id": sid, "type": "create_session"}

    @r.post("/session_heartbeat")
    async def heartbeat(request: Request) -> dict[str, Any]:
        who, f = owner(service, request), await fields(request)
        service.sessions.heartbeat(who, f.get("session_id", str))
        return {"type": "session_heartbeat"}

    @r.post("/sessions/{session_id}/finish")
    async def finish(session_id: str, request: Request) -> dict[str, Any]:
        await service.sessions.finish_session(owner(service, request), session_id)
        return {}

    @r.get("/sessions")
    async def list_sessions(
        request: Request, limit: int = 20, offset: int = 0, status: str | None = None
    ) -> dict[str, Any]:
        if status is not None and status not in ("active", "finished", "expired"):
            raise UserError("status: must be one of active, finished, expired", field="status")
        return {"sessions": service.sessions.list_sessions(owner(service, request), status, limit, offset)}

    @r.get("/sessions/{session_id}")
    async def get_session(session_id: str, request: Request) -> dict[str, Any]:
        return service.sessions.get_session(owner(service, request), session_id)

    @r.post("/telemetry")
    async def telemetry() -> dict[str, Any]:
        return {"status": "accepted"}

    @r.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok"}

    @r.get("/workers")
    async def workers(request: Request) -> dict[str, Any]:
        owner(service, request)
        return {"workers": await asyncio.to_thread(service.workers)}

    @r.get("/get_server_capabilities")
    async def capabilities() -> dict[str, Any]:
        return {"supported_models": service.checkpoints.capabilities()}

    @r.get("/auth/apikey/me")
    async def whoami(request: Request) -> dict[str, Any]:
        who = owner(service, request)
        return {"key_id": 0, "name": who, "note": "treadle", "details": {}}
