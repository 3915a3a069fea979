"""One worker per served base model: its engine plus the scheduler thread that runs its training ops."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from treadle.engine.scheduler import Op, OpOutcome, Scheduler
from treadle.engine.types import ForwardBackwardRequest
from treadle.errors import TreadleError, UserError

if TYPE_CHECKING:
    from treadle.engine.engine import Engine

T = TypeVar("T")


@dataclasses.dataclass
class Worker:
    name: str
    engine: Engine
    scheduler: Scheduler

    def submit_call(
        self, key: str, seq_id: int | None, call: Callable[[], object], done: Callable[[OpOutcome], None]
    ) -> None:
        self.scheduler.submit(Op(key=key, seq_id=seq_id, done=done, call=call))

    def submit_fb(
        self, key: str, seq_id: int, req: ForwardBackwardRequest, done: Callable[[OpOutcome], None]
    ) -> None:
        self.scheduler.submit(Op(key=key, seq_id=seq_id, done=done, fb=req))

    async def run(self, call: Callable[[], T]) -> T:
        """Run `call` on the worker thread (unordered) and await it without blocking the event loop."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[object] = loop.create_future()

        def done(outcome: OpOutcome) -> None:
            loop.call_soon_threadsafe(_set, fut, outcome)

        self.scheduler.submit(Op(key="", seq_id=None, done=done, call=call))
        res = await fut
        if isinstance(res, TreadleError):
            raise res
        return res  # type: ignore[return-value]


def _set(fut: asyncio.Future[object], outcome: object) -> None:
    if not fut.done():
        fut.set_result(outcome)


class WorkerPool:
    def __init__(self, engines: list[Engine]) -> None:
        self.workers = {e.name: Worker(e.name, e, Scheduler(e, e.name)) for e in engines}

    def names(self) -> list[str]:
        return list(self.workers)

    def get(self, base_model: str, field: str = "base_model") -> Worker:
        w = self.workers.get(base_model)
        if w is None:
            raise UserError(
                f"{field}: {base_model!r} is not served here; served models: {', '.join(self.workers)}",
                field=field,
            )
        return w

    def close(self) -> None:
        for w in self.workers.values():
            w.scheduler.stop()
            w.engine.close()
        # engines may share a compute thread that none of them owns
        for compute in {id(w.engine.compute): w.engine.compute for w in self.workers.values()}.values():
            compute.close()
