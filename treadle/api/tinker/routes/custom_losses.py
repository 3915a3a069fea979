"""Server-side custom losses (SDK 0.38 `ServiceClient.create_custom_loss`): upload a traced loss graph; it
answers with a future whose result is the `loss_id` that `forward_backward(data, "custom", {"loss_id": …})`
names."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from treadle.api.tinker.routes.wire import fields, future, owner
from treadle.service.tinker_service import TinkerService


def add_routes(r: APIRouter, service: TinkerService) -> None:
    @r.post("/create_custom_loss")
    async def create_custom_loss(request: Request) -> dict[str, Any]:
        who, f = owner(service, request), await fields(request)
        rid = service.custom_losses.create(
            who,
            f.get("session_id", str),
            f.get("custom_loss_seq_id", int),
            f.raw.get("name"),
            f.raw.get("inputs"),
            f.raw.get("graph"),
        )
        return future(rid)
