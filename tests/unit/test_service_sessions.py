"""TinkerService in-process with a real engine: a silent session expires and its adapters leave memory while
its checkpoints stay on disk and loadable; expired checkpoint TTLs are enforced; retried submissions map
to the same future."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from treadle.engine.types import AdamParams, Datum, ForwardBackwardRequest, LoraConfig
from treadle.errors import GoneError, NotFoundError
from treadle.models.tiny import write_tiny_model
from treadle.server import ServerConfig, build_service
from treadle.service.paths import CheckpointRef
from treadle.service.tinker_service import TinkerService
from treadle.store import utcnow


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinkerService]:
    model = write_tiny_model(tmp_path_factory.mktemp("tiny"))
    svc = build_service(ServerConfig(models=[str(model)], data_dir=tmp_path_factory.mktemp("data")))
    yield svc
    svc.close()


async def _result(svc: TinkerService, rid: str) -> Any:
    out = await svc.requests.retrieve("local", rid, timeout_s=60)
    assert out is not None and out.error is None, out
    return out.result


def _fb() -> ForwardBackwardRequest:
    t = torch.tensor([1, 2, 3, 4])
    return ForwardBackwardRequest(None, [Datum(t, {"target_tokens": torch.roll(t, -1)})], "cross_entropy")


def test_expiry_releases_adapters_but_keeps_checkpoints(service: TinkerService) -> None:
    base = service.pool.names()[0]
    engine = service.pool.get(base)

    async def main() -> None:
        sid = service.sessions.create_session("local", [], {})
        rid, mid = service.training.create_model("local", sid, 0, base, LoraConfig(rank=4), {})
        await _result(service, rid)
        await _result(service, service.training.forward_backward("local", mid, 1, _fb()))
        # A retried submission (same model, same seq_id) is the same future and does not run twice.
        first = service.training.optim_step("local", mid, 2, AdamParams())
        assert service.training.optim_step("local", mid, 2, AdamParams()) == first
        await _result(service, first)
        saved = await _result(
            service,
            service.weights.save_weights(
                "local", mid, 3, "keep", kind="weights", ttl_seconds=None, overwrite=False, user_metadata={}
            ),
        )
        assert engine.has_adapter(mid)

        service.cfg.session_timeout_s = 0.0
        try:
            assert sid in service.sessions.expire_sessions()
        finally:
            service.cfg.session_timeout_s = 600.0
        await service.pool.get(base).run(lambda: None)  # the release runs on the worker: wait for it
        assert not engine.has_adapter(mid)
        with pytest.raises(GoneError):
            service.sessions.heartbeat("local", sid)
        with pytest.raises(NotFoundError, match="create_training_client_from_state"):
            service.training.optim_step("local", mid, 4, AdamParams())

        sid2 = service.sessions.create_session("local", [], {})
        rid, mid2 = service.weights.load_weights_new("local", sid2, 0, saved.path, True, None)
        await _result(service, rid)
        assert engine.has_adapter(mid2)
        assert (
            service.checkpoints.list_checkpoints("local", mid)["checkpoints"][0]["tinker_path"] == saved.path
        )

    asyncio.run(main())


def test_expired_ttl_deletes_checkpoint(service: TinkerService) -> None:
    base = service.pool.names()[0]

    async def main() -> None:
        sid = service.sessions.create_session("local", [], {})
        rid, mid = service.training.create_model("local", sid, 0, base, LoraConfig(rank=4), {})
        await _result(service, rid)
        await _result(
            service,
            service.weights.save_weights(
                "local", mid, 1, "short", kind="weights", ttl_seconds=3600, overwrite=False, user_metadata={}
            ),
        )
        ref = CheckpointRef(mid, "weights", "short")
        assert service.blobs.exists(ref.run_id, ref.kind, ref.name)
        service.store.update_checkpoint(
            ref.run_id, ref.kind, ref.name, expires_at=utcnow() - dt.timedelta(seconds=1)
        )
        with pytest.raises(NotFoundError):  # expired is invisible even before the sweep
            service.checkpoints.get_checkpoint("local", ref)
        assert service.checkpoints.sweep_expired_checkpoints() == 1
        assert not service.blobs.exists(ref.run_id, ref.kind, ref.name)
        assert service.checkpoints.list_checkpoints("local", mid)["checkpoints"] == []

    asyncio.run(main())
