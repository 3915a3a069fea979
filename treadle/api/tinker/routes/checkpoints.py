"""The REST side (protocol §10): training runs and their checkpoints (list, get, delete, publish, TTL),
signed download URLs and the blobs behind them, weights info and server-side copies.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse
from starlette.exceptions import HTTPException

from treadle.api.tinker.routes.wire import PREFIX, fields, owner
from treadle.service import paths
from treadle.service.paths import CheckpointRef
from treadle.service.tinker_service import TinkerService


def ref(run_id: str, kind: str, name: str) -> CheckpointRef:
    """The checkpoint a `/training_runs/{run_id}/checkpoints/{kind}/{name}` path names, checked by the service."""
    return paths.checkpoint_ref(run_id, kind, name, "checkpoint_id")


_ACTIONS = ("publish", "ttl", "external_weights_urls")


def malformed_checkpoint(method: str, rest: str) -> None:
    """Why `/training_runs/{run_id}/checkpoints/{rest}` matched no route: a malformed checkpoint id (400 naming
    the expected form, e.g. a bare `ckpt0` without its kind) or a method the route does not take (405)."""
    paths.checkpoint_id_parts(rest, _ACTIONS, "checkpoint_id")  # the 400, if the id is malformed
    raise HTTPException(405, f"method: {method} is not allowed on this checkpoint route")


def add_routes(r: APIRouter, service: TinkerService) -> None:
    @r.get("/training_runs")
    async def list_runs(request: Request, limit: int = 20, offset: int = 0) -> dict[str, Any]:
        return service.checkpoints.list_runs(owner(service, request), limit, offset)

    @r.get("/training_runs/{run_id}")
    async def get_run(run_id: str, request: Request) -> dict[str, Any]:
        return service.checkpoints.get_run(owner(service, request), run_id)

    @r.get("/training_runs/{run_id}/checkpoints")
    async def run_checkpoints(run_id: str, request: Request) -> dict[str, Any]:
        return service.checkpoints.list_checkpoints(owner(service, request), run_id)

    @r.get("/checkpoints")
    async def all_checkpoints(request: Request, limit: int = 100, offset: int = 0) -> dict[str, Any]:
        return service.checkpoints.list_checkpoints(owner(service, request), None, limit, offset)

    @r.get("/training_runs/{run_id}/checkpoints/{kind}/{name}")
    async def get_checkpoint(run_id: str, kind: str, name: str, request: Request) -> dict[str, Any]:
        return service.checkpoints.get_checkpoint(owner(service, request), ref(run_id, kind, name))

    @r.delete("/training_runs/{run_id}/checkpoints/{kind}/{name}")
    async def delete_checkpoint(run_id: str, kind: str, name: str, request: Request) -> dict[str, Any]:
        service.checkpoints.delete_checkpoint(owner(service, request), ref(run_id, kind, name))
        return {}

    @r.post("/training_runs/{run_id}/checkpoints/{kind}/{name}/publish")
    async def publish(run_id: str, kind: str, name: str, request: Request) -> dict[str, Any]:
        service.checkpoints.set_public(owner(service, request), ref(run_id, kind, name), True)
        return {}

    @r.delete("/training_runs/{run_id}/checkpoints/{kind}/{name}/publish")
    async def unpublish(run_id: str, kind: str, name: str, request: Request) -> dict[str, Any]:
        service.checkpoints.set_public(owner(service, request), ref(run_id, kind, name), False)
        return {}

    @r.put("/training_runs/{run_id}/checkpoints/{kind}/{name}/ttl")
    async def set_ttl(run_id: str, kind: str, name: str, request: Request) -> dict[str, Any]:
        who, f = owner(service, request), await fields(request)
        service.checkpoints.set_ttl(who, ref(run_id, kind, name), f.get("ttl_seconds", int, None))
        return {}

    @r.get("/training_runs/{run_id}/checkpoints/{kind}/{name}/external_weights_urls")
    async def external_urls(run_id: str, kind: str, name: str, request: Request) -> dict[str, Any]:
        urls, expires = service.checkpoints.external_urls(owner(service, request), ref(run_id, kind, name))
        base = str(request.base_url).rstrip("/") + PREFIX + "/"
        return {
            "urls": {k: base + v for k, v in urls.items()},
            "expires": dt.datetime.fromtimestamp(expires, dt.UTC).isoformat(),
        }

    @r.get("/blobs/{token}/{rel:path}")
    async def blob(token: str, rel: str) -> Response:
        # No X-API-Key: the SDK fetches these with plain urllib, so the signed token is the authorization.
        return FileResponse(service.checkpoints.blob_file(token, rel))

    @r.api_route("/training_runs/{run_id}/checkpoints/{rest:path}", methods=["GET", "POST", "PUT", "DELETE"])
    async def malformed_checkpoint_path(run_id: str, rest: str, request: Request) -> None:
        # Registered after every well-formed checkpoint route, so only what they did not match lands here.
        malformed_checkpoint(request.method, rest)

    @r.post("/weights_info")
    async def weights_info(request: Request) -> dict[str, Any]:
        who, f = owner(service, request), await fields(request)
        return service.checkpoints.weights_info(who, f.get("tinker_path", str))

    @r.post("/copy_weights")
    async def copy_weights(request: Request) -> dict[str, Any]:
        who, f = owner(service, request), await fields(request)
        return {
            "tinker_path": service.checkpoints.copy_weights(
                who, f.get("source_path", str), f.get("ttl_seconds", int, None)
            )
        }
