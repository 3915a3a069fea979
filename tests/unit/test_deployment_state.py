"""The deployment state machine on a real in-process service (tiny model, real sampler checkpoints saved through
the service): create → promote → rollback versions and history, the live pointer each request reads, refusals
that change nothing, owner scoping, and the live version surviving a restart of the service object."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from treadle.engine.types import LoraConfig
from treadle.errors import ConflictError, NotFoundError, TreadleError, UserError
from treadle.models.tiny import write_tiny_model
from treadle.server import ServerConfig, build_service
from treadle.service.deployments import Deployments
from treadle.service.tinker_service import TinkerService
from treadle.service.traces import Traces
from treadle.store.traces import TraceStore


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinkerService]:
    model = write_tiny_model(tmp_path_factory.mktemp("tiny"))
    svc = build_service(ServerConfig(models=[str(model)], data_dir=tmp_path_factory.mktemp("data")))
    yield svc
    svc.close()


def _run(x: Any) -> Any:
    """Deployments' mutations and lookup are coroutines (they await an adapter load on its worker)."""
    return asyncio.run(x)


def _deployments(service: TinkerService) -> Deployments:
    store = TraceStore(service.store)
    return Deployments(service, store, Traces(store))


async def _result(svc: TinkerService, rid: str) -> Any:
    out = await svc.requests.retrieve("local", rid, timeout_s=60)
    assert out is not None and out.error is None, out
    return out.result


@pytest.fixture(scope="module")
def checkpoints(service: TinkerService) -> list[str]:
    """Two sampler checkpoints owned by "local"."""
    base = service.pool.names()[0]

    async def main() -> list[str]:
        sid = service.sessions.create_session("local", [], {})
        rid, mid = service.training.create_model("local", sid, 0, base, LoraConfig(rank=4), {})
        await _result(service, rid)
        paths = []
        for seq, name in ((1, "a"), (2, "b")):
            rid = service.weights.save_weights(
                "local",
                mid,
                seq,
                name,
                kind="sampler_weights",
                ttl_seconds=None,
                overwrite=False,
                user_metadata={},
            )
            paths.append((await _result(service, rid)).path)
        return paths

    return asyncio.run(main())


def test_create_promote_rollback(service: TinkerService, checkpoints: list[str]) -> None:
    d = _deployments(service)
    base = service.pool.names()[0]
    a, b = checkpoints
    made = _run(d.create("local", "sm-bot", base))
    assert (made["version"], made["model_path"], made["base_model"]) == (1, base, base)
    target = _run(d.lookup("sm-bot", "local"))
    assert target is not None and target.adapter_id is None and target.served.version == 1

    p = _run(d.promote("local", "sm-bot", a, "better"))
    assert (p["version"], p["model_path"]) == (2, a)
    target = _run(d.lookup("sm-bot", "local"))
    assert target is not None and target.served.version == 2
    assert target.adapter_id is not None and target.engine.has_adapter(
        target.adapter_id
    )  # loaded before live

    assert _run(d.promote("local", "sm-bot", b))["version"] == 3
    back = _run(d.rollback("local", "sm-bot"))  # default: the version before the live one
    assert (back["version"], back["model_path"]) == (4, a)
    first = _run(d.rollback("local", "sm-bot", 1, "bad day"))
    assert (first["version"], first["model_path"]) == (5, base)
    assert [(h["version"], h["reason"]) for h in first["history"]] == [
        (1, "create"),
        (2, "better"),
        (3, "promote"),
        (4, "rollback to v2"),
        (5, "rollback to v1: bad day"),
    ]
    assert [x["name"] for x in d.list_all("local")["deployments"]] == ["sm-bot"]

    # A fresh service object over the same DB (a restart) serves the same live version.
    again = _run(_deployments(service).lookup("sm-bot", "local"))
    assert again is not None and (again.served.version, again.served.model_path) == (5, base)


@pytest.mark.parametrize(
    ("call", "error", "field"),
    [
        (lambda d, base, a: _run(d.create("local", "rf-bot", base)), ConflictError, "name"),
        (lambda d, base, a: _run(d.create("local", "bad name!", base)), UserError, "name"),
        (lambda d, base, a: _run(d.create("local", base, base)), UserError, "name"),
        (
            lambda d, base, a: _run(d.create("local", "new", "tinker://nope/sampler_weights/x")),
            NotFoundError,
            "model_path",
        ),
        (lambda d, base, a: _run(d.create("local", "new", "no-such-model")), NotFoundError, "model_path"),
        (
            lambda d, base, a: _run(d.promote("local", "rf-bot", "tinker://nope/sampler_weights/x")),
            NotFoundError,
            "model_path",
        ),
        (
            lambda d, base, a: _run(d.promote("local", "rf-bot", "tinker://x/bogus/y")),
            UserError,
            "model_path",
        ),
        (lambda d, base, a: _run(d.promote("local", "rf-bot", None)), UserError, "model_path"),
        (lambda d, base, a: _run(d.promote("local", "rf-bot", a, "x" * 3000)), UserError, "reason"),
        (lambda d, base, a: _run(d.promote("bob", "rf-bot", a)), NotFoundError, "deployment"),
        (lambda d, base, a: _run(d.rollback("local", "rf-bot")), UserError, "version"),
        (lambda d, base, a: _run(d.rollback("local", "rf-bot", 7)), NotFoundError, "version"),
        (lambda d, base, a: _run(d.rollback("local", "rf-bot", "1")), UserError, "version"),
        (lambda d, base, a: _run(d.rollback("local", "rf-bot", 1)), UserError, "version"),
    ],
)
def test_refusals_change_nothing(service: TinkerService, checkpoints: list[str], call, error, field) -> None:
    d = _deployments(service)
    base = service.pool.names()[0]
    if d.store.get_deployment("local", "rf-bot") is None:
        _run(d.create("local", "rf-bot", base))
    before = d.get("local", "rf-bot")
    with pytest.raises(error) as e:
        call(d, base, checkpoints[0])
    assert isinstance(e.value, TreadleError) and e.value.field == field, e.value.message
    assert d.get("local", "rf-bot") == before
    assert d.store.get_deployment("local", "new") is None


def test_owner_scoping(service: TinkerService, checkpoints: list[str]) -> None:
    d = _deployments(service)
    _run(d.create("local", "own-bot", checkpoints[0]))
    assert _run(d.lookup("own-bot", "bob")) is None
    with pytest.raises(NotFoundError, match="your deployments: none"):
        d.get("bob", "own-bot")
    with pytest.raises(
        NotFoundError, match="model_path"
    ):  # another owner's checkpoint does not exist for bob
        _run(d.create("bob", "own-bot", checkpoints[0]))
    with pytest.raises(NotFoundError, match="own-bot"):
        d.get("local", "no-such-bot")  # the 404 lists the caller's deployments
