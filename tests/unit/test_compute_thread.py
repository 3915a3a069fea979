"""One compute thread per device: whatever thread calls the engine, every model pass runs on the engine's compute
thread (see treadle/engine/compute.py for why: a second OpenMP team makes every op slower), and the thread itself
behaves like an executor — results, exceptions, re-entrancy, orderly close."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from treadle.engine import AdamParams, Datum, Engine, ForwardBackwardRequest, LoraConfig
from treadle.engine.compute import ComputeThread
from treadle.engine.types import SampleRequest, SamplingParams
from treadle.errors import TreadleError


def test_call_returns_results_and_raises_errors() -> None:
    c = ComputeThread()
    try:
        assert c.call(lambda a, b=0: a + b, 2, b=3) == 5
        assert c.call(threading.get_ident) != threading.get_ident()
        with pytest.raises(ZeroDivisionError):
            c.call(lambda: 1 / 0)
        # re-entrant: a job may call back into its own thread without deadlocking
        assert c.call(lambda: c.call(lambda: "inner")) == "inner"
    finally:
        c.close()


def test_close_runs_queued_jobs_then_refuses() -> None:
    c = ComputeThread()
    gate = threading.Event()
    c.submit(gate.wait, 30)
    futs = [c.submit(lambda i=i: i * i) for i in range(5)]
    closer = threading.Thread(target=c.close)
    closer.start()
    gate.set()
    closer.join(30)
    assert [f.result(0) for f in futs] == [0, 1, 4, 9, 16]
    with pytest.raises(TreadleError, match="closed"):
        c.submit(lambda: None)


def test_every_model_pass_runs_on_the_compute_thread(tiny_model_dir: Path, tmp_path: Path) -> None:
    engine = Engine(str(tiny_model_dir))
    seen: set[int] = set()
    engine.model.register_forward_pre_hook(lambda *_: seen.add(threading.get_ident()))
    t = torch.arange(1, 13)
    datum = Datum(t[:-1], {"target_tokens": t[1:], "weights": torch.ones(11)})
    sp = SamplingParams(max_tokens=4, temperature=1.0, seed=1, stop=())

    def work(i: int) -> None:
        name = f"a{i}"
        engine.create_adapter(name, LoraConfig(rank=4, seed=i))
        engine.forward_backward([ForwardBackwardRequest(name, [datum], "cross_entropy")])
        engine.optim_step(name, AdamParams(learning_rate=1e-3))
        engine.generate(SampleRequest(name, [1, 2, 3], sp))
        engine.save_adapter(name, tmp_path / name, optimizer=True)
        engine.load_adapter(f"{name}-copy", tmp_path / name, optimizer=True)
        engine.forward_backward([ForwardBackwardRequest(f"{name}-copy", [datum], "cross_entropy")])

    try:
        work(0)  # from the main thread
        with ThreadPoolExecutor(3) as ex:  # and from several others at once
            list(ex.map(work, range(1, 4)))
        compute_ident = engine.compute.call(threading.get_ident)
    finally:
        engine.close()
    assert seen == {compute_ident}
