"""A worker: one engine (in any placement) plus the scheduler thread that orders and fuses its training ops.

This is the whole interface the service has to a base model: ordered training ops (seq_id order per model,
ready forward_backwards of different models fused into one batch), unordered calls, sampling with token
streaming and cancellation, adapter create/save/load/snapshot/remove, info and health. The service never sees
the engine behind it, so the same service code drives an in-process `Engine`, a child process or a Ray actor.

The scheduler runs in the caller's process: ordering and fusion decisions are made here, and only the fused
batch crosses to the engine. When the engine's process dies, `on_lost` listeners hear which worker it was (the
service then forgets the runs that lived there) and the engine is restarted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from treadle.engine.placement.api import EngineAPI
from treadle.engine.scheduler import Op, OpOutcome, Scheduler
from treadle.engine.types import (
    AdamParams,
    ForwardBackwardRequest,
    LoraConfig,
    SampleRequest,
    SampleResult,
)
from treadle.errors import TreadleError, UserError

if TYPE_CHECKING:
    from treadle.engine.engine import EngineInfo
    from treadle.engine.sampler import TokenCallback
    from treadle.engine.vision_input import ImageExpander

log = logging.getLogger(__name__)

T = TypeVar("T")
LostListener = Callable[["Worker", str], None]


class Worker:
    def __init__(self, name: str, engine: EngineAPI, *, replica: int = 0) -> None:
        self.name = name  # the base model it serves
        self.replica = replica
        self._engine = engine
        self.scheduler = Scheduler(engine, f"{name}#{replica}")
        self._lost: list[LostListener] = []
        self._lock = threading.Lock()
        self.samples_in_flight = 0  # for choosing among replicas (read without the lock: a hint)
        set_handler = getattr(engine, "set_lost_handler", None)
        if set_handler is not None:  # a placement whose process can die (subprocess, Ray)
            set_handler(self._notify_lost)

    @property
    def label(self) -> str:
        return self.name if self.replica == 0 else f"{self.name} (replica {self.replica})"

    # ---- what the model is -------------------------------------------------------------------------------
    @property
    def info(self) -> EngineInfo:
        return self._engine.info

    @property
    def tokenizer(self) -> Any:
        return self._engine.tokenizer

    @property
    def images(self) -> ImageExpander:
        return self._engine.images

    def health(self) -> dict[str, Any]:
        return self._engine.health()

    def status(self) -> dict[str, Any]:
        """What an operator sees per worker: the model, replica, placement, pid and whether it serves now."""
        out: dict[str, Any] = {
            "model": self.name,
            "replica": self.replica,
            "placement": getattr(self._engine, "placement", "inprocess"),
        }
        pid = getattr(self._engine, "pid", None)
        if pid is not None:
            out["pid"] = pid
        try:
            out.update(self._engine.health())
            out["state"] = "serving"
        except TreadleError as e:
            out["state"] = "lost"
            out["detail"] = e.message
        return out

    # ---- ordered and unordered ops ---------------------------------------------------------------------------
    def open(self, key: str, next_seq: int = 1) -> None:
        """Start ordering `key`'s ops (a training run) at `next_seq`."""
        self.scheduler.open(key, next_seq)

    def close_stream(self, key: str, reason: str, error: TreadleError | None = None) -> None:
        """Stop ordering `key`; its buffered ops fail with `error` (default: a NotFoundError naming `reason`)."""
        self.scheduler.close(key, reason, error)

    def submit_call(
        self, key: str, seq_id: int | None, call: Callable[[], object], done: Callable[[OpOutcome], None]
    ) -> None:
        """Run `call` on the scheduler thread: after `key`'s op `seq_id - 1`, or as soon as free (seq_id None)."""
        self.scheduler.submit(Op(key=key, seq_id=seq_id, done=done, call=call))

    def submit_fb(
        self, key: str, seq_id: int, req: ForwardBackwardRequest, done: Callable[[OpOutcome], None]
    ) -> None:
        self.scheduler.submit(Op(key=key, seq_id=seq_id, done=done, fb=req))

    async def run(self, call: Callable[[], T]) -> T:
        """Run `call` on the scheduler thread (unordered) and await it without blocking the event loop."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[object] = loop.create_future()

        def done(outcome: OpOutcome) -> None:
            loop.call_soon_threadsafe(_set, fut, outcome)

        self.scheduler.submit(Op(key="", seq_id=None, done=done, call=call))
        res = await fut
        if isinstance(res, TreadleError):
            raise res
        return res  # type: ignore[return-value]

    # ---- engine calls (made from the scheduler thread, inside ops) ---------------------------------------
    def create_adapter(self, adapter_id: str, cfg: LoraConfig) -> None:
        self._engine.create_adapter(adapter_id, cfg)

    def remove_adapter(self, adapter_id: str) -> None:
        self._engine.remove_adapter(adapter_id)

    def has_adapter(self, adapter_id: str) -> bool:
        return self._engine.has_adapter(adapter_id)

    def snapshot_adapter(self, src_id: str, dst_id: str) -> None:
        self._engine.snapshot_adapter(src_id, dst_id)

    def save_adapter(self, adapter_id: str, directory: Path, *, optimizer: bool) -> None:
        self._engine.save_adapter(adapter_id, directory, optimizer=optimizer)

    def load_adapter(self, adapter_id: str, directory: Path, *, optimizer: bool) -> LoraConfig:
        return self._engine.load_adapter(adapter_id, directory, optimizer=optimizer)

    def optim_step(self, adapter_id: str, params: AdamParams) -> dict[str, float]:
        return self._engine.optim_step(adapter_id, params)

    def prepare_forward_backward(self, req: ForwardBackwardRequest) -> None:
        """Expand image chunks here, at the edge: a bad image is refused before a future exists."""
        self.images.forward_backward(req)

    def prepare_sample(self, req: SampleRequest) -> None:
        self.images.sample(req)

    def sample(
        self, req: SampleRequest, on_token: TokenCallback | None = None
    ) -> concurrent.futures.Future[SampleResult]:
        fut = self._engine.sample(req, on_token)
        with self._lock:
            self.samples_in_flight += 1
        fut.add_done_callback(self._sample_done)
        return fut

    def _sample_done(self, _fut: concurrent.futures.Future[SampleResult]) -> None:
        with self._lock:
            self.samples_in_flight -= 1

    @property
    def training_busy(self) -> bool:
        """Running a training op (or another scheduled call) right now."""
        return self.scheduler.busy

    # ---- adapters between replicas (placements that support it: Ray) ---------------------------------
    @property
    def moves_adapters(self) -> bool:
        return hasattr(self._engine, "export_adapter") and hasattr(self._engine, "import_adapter")

    def export_adapter(self, adapter_id: str) -> Any:
        """A handle to the adapter's weights that another replica's `import_adapter` takes."""
        return self._engine.export_adapter(adapter_id)  # type: ignore[attr-defined]

    def import_adapter(self, adapter_id: str, handle: Any) -> None:
        self._engine.import_adapter(adapter_id, handle)  # type: ignore[attr-defined]

    # ---- faults ---------------------------------------------------------------------------------------------
    def on_lost(self, listener: LostListener) -> None:
        """`listener(worker, why)` runs (on some thread) as soon as the engine's process is found dead, before
        the placement brings up a fresh one: everything that lived only in its memory is gone."""
        with self._lock:
            self._lost.append(listener)

    def _notify_lost(self, why: str) -> None:
        with self._lock:
            listeners = list(self._lost)
        for listener in listeners:
            try:
                listener(self, why)
            except Exception:
                log.exception("worker-lost listener failed")

    def stop(self) -> None:
        self.scheduler.stop()
        self._engine.close()


def _set(fut: asyncio.Future[object], outcome: object) -> None:
    if not fut.done():
        fut.set_result(outcome)


class WorkerPool:
    """The served base models, each with one or more replicas (Ray: `--replicas N`).

    A training run is pinned to one replica (`place`): its adapter and optimizer state live there. Sampling a
    base model or a checkpoint can run on any replica (`any_replica`)."""

    def __init__(self, workers: list[Worker], close: Callable[[], None] | None = None) -> None:
        self._replicas: dict[str, list[Worker]] = {}
        for w in workers:
            self._replicas.setdefault(w.name, []).append(w)
        self._next: dict[str, int] = {}
        self._close = close

    def names(self) -> list[str]:
        return list(self._replicas)

    def all(self) -> list[Worker]:
        return [w for ws in self._replicas.values() for w in ws]

    def serves(self, base_model: str) -> bool:
        return base_model in self._replicas

    def replicas(self, base_model: str, field: str = "base_model") -> list[Worker]:
        ws = self._replicas.get(base_model)
        if ws is None:
            raise UserError(
                f"{field}: {base_model!r} is not served here; served models: {', '.join(self._replicas)}",
                field=field,
            )
        return ws

    def get(self, base_model: str, field: str = "base_model") -> Worker:
        """The first replica (the only one without Ray): for info that every replica shares."""
        return self.replicas(base_model, field)[0]

    def place(self, base_model: str, field: str = "base_model") -> Worker:
        """The replica a new training run lives on: round-robin, so runs spread over the replicas."""
        ws = self.replicas(base_model, field)
        i = self._next.get(base_model, 0)
        self._next[base_model] = i + 1
        return ws[i % len(ws)]

    def any_replica(self, base_model: str, field: str = "base_model") -> Worker:
        """A replica for sampling work that any of them can run (the base model, a checkpoint from disk)."""
        return self.place(base_model, field)

    def on_lost(self, listener: LostListener) -> None:
        for w in self.all():
            w.on_lost(listener)

    def close(self) -> None:
        for w in self.all():
            w.stop()
        if self._close is not None:
            self._close()
