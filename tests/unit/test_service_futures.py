"""FutureHub: a worker thread resolving a future wakes the long-poll at once; pending polls time out;
another owner cannot see the future; results survive in the DB after the in-memory entry is gone."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from treadle.errors import NotFoundError, UserError
from treadle.service.futures import FutureHub, Outcome
from treadle.service.results import Optimized
from treadle.store import MetadataStore


@pytest.fixture
def hub(tmp_path: Path) -> FutureHub:
    return FutureHub(MetadataStore(f"sqlite:///{tmp_path / 'meta.db'}"))


def test_resolve_from_a_thread_wakes_the_waiter(hub: FutureHub) -> None:
    async def main() -> Outcome | None:
        rid, created = hub.create("alice", "optim_step", "op:m:1")
        assert created
        threading.Thread(target=hub.resolve, args=(rid, Outcome(result=Optimized({"x:sum": 1.0})))).start()
        return await hub.wait(rid, "alice", timeout_s=30)

    out = asyncio.run(main())
    assert out is not None and out.result == Optimized({"x:sum": 1.0})


def test_pending_times_out_then_resolves_and_replays_from_db(hub: FutureHub) -> None:
    async def main() -> None:
        rid, _ = hub.create("alice", "sample", None)
        assert await hub.wait(rid, "alice", timeout_s=0.01) is None
        hub.fail(rid, UserError("prompt: bad", field="prompt"))
        first = await hub.wait(rid, "alice", timeout_s=1)
        again = await hub.wait(rid, "alice", timeout_s=1)  # a re-poll after the entry left memory
        assert first == again == Outcome(error="prompt: bad", category="user")

    asyncio.run(main())


def test_other_owner_and_unknown_ids_are_not_found(hub: FutureHub) -> None:
    async def main() -> None:
        rid, _ = hub.create("alice", "sample", None)
        with pytest.raises(NotFoundError):
            await hub.wait(rid, "bob", timeout_s=0.01)
        with pytest.raises(NotFoundError):
            await hub.wait("nope", "alice", timeout_s=0.01)

    asyncio.run(main())


def test_duplicate_submission_is_not_created_twice(hub: FutureHub) -> None:
    async def main() -> None:
        a, created_a = hub.create("alice", "forward_backward", "op:m:7")
        b, created_b = hub.create("alice", "forward_backward", "op:m:7")
        assert a == b and created_a and not created_b

    asyncio.run(main())
