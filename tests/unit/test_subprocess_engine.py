"""The subprocess placement against an in-process `Engine` on the same tiny model (issue 12 §1, §2): the same
results bitwise (deterministic mode), errors that arrive as the same type with the same field, tokens that
stream in order, cancel that stops a generation, and a killed child that fails what was in flight, reports
itself lost and comes back empty."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from treadle.engine.engine import Engine
from treadle.engine.placement.api import EngineAPI, EngineSpec, WorkerLostError
from treadle.engine.placement.subprocess_engine import SubprocessEngine
from treadle.engine.types import (
    AdamParams,
    Datum,
    ForwardBackwardRequest,
    LoraConfig,
    SampleRequest,
    SamplingParams,
)
from treadle.errors import NotFoundError

pytestmark = pytest.mark.slow


def _fb(adapter: str) -> ForwardBackwardRequest:
    t = torch.tensor([1, 17, 42, 99, 7, 300, 12, 5])
    return ForwardBackwardRequest(adapter, [Datum(t[:-1], {"target_tokens": t[1:]})], "cross_entropy")


@pytest.fixture(scope="module")
def pair(tiny_model_dir: Path):
    spec = EngineSpec(str(tiny_model_dir), deterministic=True)
    remote = SubprocessEngine(spec, env={"OMP_NUM_THREADS": "1"})
    local = Engine(str(tiny_model_dir), deterministic=True)
    try:
        yield remote, local
    finally:
        remote.close()
        local.close()


def test_same_results_as_in_process(pair: tuple[SubprocessEngine, Engine]) -> None:
    remote, local = pair
    assert isinstance(remote, EngineAPI) and isinstance(local, EngineAPI)
    assert remote.info == local.info
    for e in (remote, local):
        e.create_adapter("a", LoraConfig(rank=4, seed=1))
    assert remote.has_adapter("a") and not remote.has_adapter("b")
    results = []
    for e in (remote, local):
        fb = e.forward_backward([_fb("a")])[0]
        metrics = e.optim_step("a", AdamParams(learning_rate=1e-2))
        sample = e.sample(
            SampleRequest("a", [1, 2, 3], SamplingParams(max_tokens=6, temperature=0.0))
        ).result()
        results.append(
            (fb.metrics, fb.loss_fn_outputs[0]["logprobs"].tolist(), metrics, sample.sequences[0].tokens)
        )
    assert results[0] == results[1]


def test_errors_keep_their_type_and_field(pair: tuple[SubprocessEngine, Engine]) -> None:
    remote, local = pair
    for e in (remote, local):
        with pytest.raises(NotFoundError) as err:
            e.sample(SampleRequest("nope", [1, 2], SamplingParams(max_tokens=2))).result()
        assert err.value.field == "model"
    with pytest.raises(NotFoundError) as err:
        remote.load_adapter("x", Path("/nonexistent"), optimizer=False)
    assert err.value.field == "path"


def test_tokens_stream_in_order_and_cancel_stops(pair: tuple[SubprocessEngine, Engine]) -> None:
    remote, _ = pair
    seen: list[int] = []
    res = remote.sample(
        SampleRequest(None, [1, 2, 3], SamplingParams(max_tokens=12, temperature=0.0, stop=())),
        lambda i, tok, lp: seen.append(tok),
    ).result()
    assert seen == res.sequences[0].tokens and len(seen) == 12

    started = threading.Event()
    fut = remote.sample(
        SampleRequest(None, [1, 2, 3], SamplingParams(max_tokens=2000, temperature=1.0, stop=())),
        lambda i, tok, lp: started.set(),
    )
    assert started.wait(30)
    assert fut.cancel()
    # the child stopped that generation: the next sample is not stuck behind 2000 tokens
    t0 = time.monotonic()
    remote.sample(SampleRequest(None, [1], SamplingParams(max_tokens=2, stop=()))).result(timeout=30)
    assert remote.health()["active_rows"] == 0
    assert time.monotonic() - t0 < 30


def test_kill_fails_in_flight_work_and_restarts(tiny_model_dir: Path) -> None:
    eng = SubprocessEngine(EngineSpec(str(tiny_model_dir)), env={"OMP_NUM_THREADS": "1"})
    lost: list[str] = []
    eng.set_lost_handler(lost.append)
    try:
        eng.create_adapter("a", LoraConfig(rank=4))
        fut = eng.sample(SampleRequest(None, [1, 2, 3], SamplingParams(max_tokens=2000, stop=())))
        pid = eng.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerLostError, match="SIGKILL"):
            fut.result(timeout=30)
        assert lost and "SIGKILL" in lost[0]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                eng.health()
                break
            except WorkerLostError:
                time.sleep(0.2)
        assert eng.pid != pid
        assert not eng.has_adapter("a")  # a fresh engine: nothing that lived in the dead one
        eng.create_adapter("a", LoraConfig(rank=4))
        assert eng.forward_backward([_fb("a")])[0].metrics["loss:sum"] > 0
    finally:
        eng.close()
