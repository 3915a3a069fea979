"""`make_router`: the Tinker API under `/api/v1`, one sub-router per concern, mirroring `treadle.service`."""

from __future__ import annotations

from fastapi import APIRouter

from treadle.api.tinker.routes import checkpoints, futures, sampling, sessions, training, weights
from treadle.api.tinker.routes.wire import PREFIX
from treadle.service.tinker_service import TinkerService


def make_router(service: TinkerService) -> APIRouter:
    r = APIRouter(prefix=PREFIX)
    for concern in (sessions, training, weights, sampling, futures, checkpoints):
        r.include_router(concern.make_router(service))
    return r
