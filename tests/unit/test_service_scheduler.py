"""The per-engine scheduler with the real engine: strict seq_id order per model with out-of-order arrival,
no waiting on another model's queue, and ready forward_backward ops of different models fused in one batch."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import pytest
import torch

from treadle.engine.engine import Engine
from treadle.engine.scheduler import Op, Scheduler, SeqBuffer
from treadle.engine.types import Datum, ForwardBackwardRequest, ForwardBackwardResult, LoraConfig
from treadle.errors import ConflictError, NotFoundError, TreadleError
from treadle.models.tiny import write_tiny_model


def test_seq_buffer_releases_in_order() -> None:
    buf = SeqBuffer()
    buf.open("a", 1)
    noop = lambda _o: None  # noqa: E731
    for s in (3, 1, 2):
        buf.push(Op("a", s, noop, call=lambda: None))
    released: list[int | None] = []
    while ready := buf.pop_ready():
        assert len(ready) == 1  # one op per model per round: a model's ops never run side by side
        released.append(ready[0].seq_id)
    assert released == [1, 2, 3]
    with pytest.raises(ConflictError):
        buf.push(Op("a", 2, noop, call=lambda: None))  # already ran
    with pytest.raises(NotFoundError):
        buf.push(Op("zzz", 1, noop, call=lambda: None))


class CountingEngine:
    """The real engine, with each fused call's batch recorded."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.batches: list[list[str | None]] = []

    def forward_backward(
        self, requests: list[ForwardBackwardRequest]
    ) -> Sequence[ForwardBackwardResult | TreadleError]:
        self.batches.append([r.adapter_id for r in requests])
        return self.engine.forward_backward(requests)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    e = Engine(str(write_tiny_model(tmp_path_factory.mktemp("tiny"))))
    for a in ("a", "b"):
        e.create_adapter(a, LoraConfig(rank=4, seed=0))
    yield e
    e.close()


def _fb(adapter: str) -> ForwardBackwardRequest:
    t = torch.tensor([1, 2, 3, 4, 5])
    return ForwardBackwardRequest(
        adapter, [Datum(t, {"target_tokens": torch.roll(t, -1)})], "cross_entropy", forward_only=True
    )


def test_order_isolation_and_fusion(engine: Engine) -> None:
    counting = CountingEngine(engine)
    sched = Scheduler(counting, "test")
    events: list[str] = []
    lock = threading.Lock()
    done = {k: threading.Event() for k in ("a1", "a2", "b1", "b2")}

    def record(name: str):
        def cb(outcome: object) -> None:
            assert not isinstance(outcome, TreadleError), outcome
            with lock:
                events.append(name)
            done[name].set()

        return cb

    try:
        sched.open("a")
        sched.open("b")
        # a's seq 2 arrives before seq 1 (the SDK posts a split batch's first chunk last).
        sched.submit(Op("a", 2, record("a2"), fb=_fb("a")))
        # b is not held up by a's missing predecessor (invariant 3).
        sched.submit(Op("b", 1, record("b1"), call=lambda: None))
        assert done["b1"].wait(30)
        assert not done["a2"].is_set()
        # Now both models have a forward_backward ready: they must run as one batch.
        with sched._cond:  # hold the worker so both arrive before it wakes
            sched._buffer.push(Op("b", 2, record("b2"), fb=_fb("b")))
            sched._buffer.push(Op("a", 1, record("a1"), fb=_fb("a")))
            sched._cond.notify()
        assert all(e.wait(30) for e in done.values())
        assert events.index("a1") < events.index("a2")
        assert sorted(str(a) for a in counting.batches[0]) == ["a", "b"]  # a1 and b2, fused
        assert counting.batches[1:] == [["a"]]  # a2, after a1
    finally:
        sched.stop()


def test_closing_a_model_fails_its_buffered_ops(engine: Engine) -> None:
    sched = Scheduler(engine, "close")
    outcomes: list[object] = []
    try:
        sched.open("a")
        sched.submit(Op("a", 5, outcomes.append, call=lambda: None))  # waits for 1..4 forever
        sched.close("a", "session expired")
        assert len(outcomes) == 1 and isinstance(outcomes[0], NotFoundError)
    finally:
        sched.stop()
