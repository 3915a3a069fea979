"""Saving and loading a training run's weights (protocol §5): named checkpoints, sampler weights (named or
ephemeral), encrypted external exports, and loading into a new or an existing run. Each answers a future.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from treadle.api.tinker.routes.wire import Fields, counted, fields, future, owner
from treadle.errors import UserError
from treadle.service.tinker_service import TinkerService


def add_routes(r: APIRouter, service: TinkerService) -> None:
    @r.post("/save_weights")
    async def save_weights(request: Request) -> dict[str, Any]:
        who, f = owner(service, request), await fields(request)
        with counted(service, who, f.raw.get("model_id"), f.raw.get("seq_id")):
            mid, seq_id = f.get("model_id", str), f.get("seq_id", int)
            overwrite = f.get("overwrite", bool, True)
            return future(_save(service, who, f, mid, seq_id, f.get("path", str), "weights", overwrite), mid)

    @r.post("/save_weights_for_sampler")
    async def save_for_sampler(request: Request) -> dict[str, Any]:
        who, f = owner(service, request), await fields(request)
        with counted(service, who, f.raw.get("model_id"), f.raw.get("seq_id")):
            mid, seq_id = f.get("model_id", str), f.get("seq_id", int)
            name = f.get("path", str, None)
            if name is None:
                rid = service.training.save_for_sampler_ephemeral(
                    who, mid, seq_id, f.get("sampling_session_seq_id", int)
                )
            else:
                rid = _save(service, who, f, mid, seq_id, name, "sampler_weights", True)
            return future(rid, mid)

    @r.post("/save_weights_external")
    async def save_external(request: Request) -> dict[str, Any]:
        who, f = owner(service, request), await fields(request)
        with counted(service, who, f.raw.get("model_id"), f.raw.get("seq_id")):
            mid = f.get("model_id", str)
            recipients = f.get("age_encryption_recipients", list, None)
            if recipients is not None and not all(isinstance(x, str) for x in recipients):
                raise UserError(
                    "age_encryption_recipients: must be a list of strings", field="age_encryption_recipients"
                )
            rid = service.weights.save_weights_external(
                who,
                mid,
                f.get("seq_id", int),
                f.get("path", str),
                f.get("ttl_seconds", int, None),
                recipients,
            )
            return future(rid, mid)

    @r.post("/load_weights")
    async def load_weights(request: Request) -> dict[str, Any]:
        who, f = owner(service, request), await fields(request)
        if "model_id" in f.raw and f.raw["model_id"]:  # legacy load_state into an existing run: sequenced
            with counted(service, who, f.raw.get("model_id"), f.raw.get("seq_id")):
                path, optimizer = f.get("path", str), f.get("optimizer", bool, False)
                mid = f.get("model_id", str)
                return future(
                    service.weights.load_weights_into(who, mid, f.get("seq_id", int), path, optimizer), mid
                )
        path, optimizer = f.get("path", str), f.get("optimizer", bool, False)
        rid, mid = service.weights.load_weights_new(
            who,
            f.get("session_id", str),
            f.get("model_seq_id", int),
            path,
            optimizer,
            f.get("user_metadata", dict, None),
        )
        return future(rid, mid)


def _save(
    service: TinkerService, who: str, f: Fields, mid: str, seq_id: int, name: str, kind: str, overwrite: bool
) -> str:
    """A named checkpoint of `kind`, with the body's optional TTL and metadata."""
    return service.weights.save_weights(
        who,
        mid,
        seq_id,
        name,
        kind=kind,
        ttl_seconds=f.get("ttl_seconds", int, None),
        overwrite=overwrite,
        user_metadata=f.get("user_metadata", dict, {}),
    )
