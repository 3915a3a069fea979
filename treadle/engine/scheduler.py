"""Runs the ops of one engine on its own worker thread: strictly in seq_id order per training model,
with the ready forward_backward ops of different models fused into one engine batch.

Tinker protocol §5.1: the SDK POSTs chunk 1 of a split batch *last*, so ops arrive out of order and
are buffered here until their predecessor has run; a submission never waits for a missing predecessor.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from treadle.engine.types import ForwardBackwardRequest, ForwardBackwardResult
from treadle.errors import ConflictError, NotFoundError, TreadleError

log = logging.getLogger(__name__)

OpOutcome = object  # whatever the op returns, or the TreadleError it failed with


class FusedForwardBackward(Protocol):
    def forward_backward(
        self, requests: list[ForwardBackwardRequest]
    ) -> Sequence[ForwardBackwardResult | TreadleError]: ...


@dataclasses.dataclass
class Op:
    """One unit of work. Exactly one of `fb` (fused with other models' ops) or `call` (run alone) is set."""

    key: str  # the ordering stream: a training model id
    seq_id: int | None  # None: not ordered, runs as soon as the worker is free
    done: Callable[[OpOutcome], None]  # called on the worker thread with the result or a TreadleError
    fb: ForwardBackwardRequest | None = None
    call: Callable[[], object] | None = None


class SeqBuffer:
    """Out-of-order arrivals per key, released strictly in seq_id order (not thread-safe; the scheduler locks)."""

    def __init__(self) -> None:
        self._next: dict[str, int] = {}
        self._pending: dict[str, dict[int, Op]] = {}

    def open(self, key: str, next_seq: int) -> None:
        self._next[key] = next_seq
        self._pending.setdefault(key, {})

    def is_open(self, key: str) -> bool:
        return key in self._next

    def close(self, key: str) -> list[Op]:
        """Forget `key`; return its buffered ops so the caller can fail them (nothing may hang)."""
        self._next.pop(key, None)
        return list(self._pending.pop(key, {}).values())

    def push(self, op: Op) -> None:
        assert op.seq_id is not None
        if op.key not in self._next:
            raise NotFoundError(f"model_id: {op.key!r} is not loaded on this server", field="model_id")
        if op.seq_id < self._next[op.key] or op.seq_id in self._pending[op.key]:
            raise ConflictError(
                f"seq_id: {op.seq_id} was already submitted for model {op.key!r}; "
                f"the next expected seq_id is ≥ {self._next[op.key]}",
                field="seq_id",
            )
        self._pending[op.key][op.seq_id] = op

    def pop_ready(self) -> list[Op]:
        """At most one op per key (ops of one model run one after another), each the next in its order."""
        ready: list[Op] = []
        for key, nxt in self._next.items():
            op = self._pending[key].pop(nxt, None)
            if op is not None:
                self._next[key] = nxt + 1
                ready.append(op)
        return ready

    def waiting(self, key: str) -> list[int]:
        return sorted(self._pending.get(key, {}))


class Scheduler:
    """The worker thread of one engine. `submit` never blocks on the engine."""

    def __init__(self, engine: FusedForwardBackward, name: str) -> None:
        self._engine = engine
        self._buffer = SeqBuffer()
        self._unordered: collections.deque[Op] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self.busy = False  # running ops right now (a hint for placing samples among replicas)
        self._thread = threading.Thread(target=self._loop, name=f"treadle-worker-{name}", daemon=True)
        self._thread.start()

    def open(self, key: str, next_seq: int = 1) -> None:
        with self._cond:
            self._buffer.open(key, next_seq)

    def is_open(self, key: str) -> bool:
        with self._cond:
            return self._buffer.is_open(key)

    def close(self, key: str, reason: str, error: TreadleError | None = None) -> None:
        """Forget `key`; its buffered ops fail with `error` (default: a NotFoundError naming `reason`)."""
        with self._cond:
            dropped = self._buffer.close(key)
        for op in dropped:
            op.done(error or NotFoundError(f"model_id: {key!r} was released before this op ran ({reason})"))

    def submit(self, op: Op) -> None:
        """Queue `op`; raises (without queueing) if its model is unknown or its seq_id was already used."""
        with self._cond:
            if self._stopping:
                raise TreadleError("server is shutting down")
            if op.seq_id is None:
                self._unordered.append(op)
            else:
                self._buffer.push(op)
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=30)

    def _take(self) -> list[Op] | None:
        with self._cond:
            while True:
                ready = self._buffer.pop_ready()
                while self._unordered:
                    ready.append(self._unordered.popleft())
                if ready:
                    return ready
                if self._stopping:
                    return None
                self._cond.wait()

    def _loop(self) -> None:
        while (ready := self._take()) is not None:
            self.busy = True
            fused = [op for op in ready if op.fb is not None]
            if fused:
                self._run_fused(fused)
            for op in ready:
                if op.call is not None:
                    _finish(op, _run_call(op.call))
            self.busy = False

    def _run_fused(self, ops: list[Op]) -> None:
        try:
            results = list(self._engine.forward_backward([op.fb for op in ops if op.fb is not None]))
        except TreadleError as e:
            results = [e] * len(ops)
        except Exception as e:  # an engine bug must fail these futures, not kill the worker
            log.exception("forward_backward batch failed")
            results = [TreadleError(f"internal error in forward_backward: {e}")] * len(ops)
        for op, res in zip(ops, results, strict=True):
            _finish(op, res)


def _run_call(call: Callable[[], object]) -> OpOutcome:
    try:
        return call()
    except TreadleError as e:
        return e
    except Exception as e:
        log.exception("op failed")
        return TreadleError(f"internal error: {type(e).__name__}: {e}")


def _finish(op: Op, outcome: OpOutcome) -> None:
    try:
        op.done(outcome)
    except Exception:
        log.exception("op completion callback failed")
