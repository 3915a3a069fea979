"""Faults stay inside one worker process (issue 12 §2), through the official SDK against a real `treadle serve`
with its default placement (a worker process per model) serving two models:

- `kill -9` of one model's worker while a training op and samples are in flight: each future resolves within
  seconds with an error of category `server` saying the worker died; the other model keeps serving meanwhile;
  the worker comes back; the run continues from its last saved checkpoint exactly; the checkpoint on disk is
  intact.
- A request that needs more memory than the worker may take fails alone with an out-of-memory error, and the
  same worker serves the next request.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tinker
from tinker import types

from tests.e2e.conftest import API_KEY, ServerProcess
from treadle.models.tiny import write_tiny_model

pytestmark = pytest.mark.slow

TOKENS = [1, 17, 42, 99, 7, 300, 12, 5]
ADAM = types.AdamParams(learning_rate=1e-2)


def _datum(tokens: list[int] = TOKENS) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData.from_numpy(np.array(tokens[1:], dtype=np.int64)),
            "weights": types.TensorData.from_numpy(np.ones(len(tokens) - 1, dtype=np.float32)),
        },
    )


@pytest.fixture(scope="module")
def server(e2e_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    other = write_tiny_model(tmp_path_factory.mktemp("tiny-other"), family="llama", seed=1)
    s = ServerProcess(e2e_model_dir, tmp_path_factory.mktemp("faults") / "data", "--model", str(other))
    s.start()
    s.other = str(other)  # type: ignore[attr-defined]
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def capped_server(e2e_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    s = ServerProcess(
        e2e_model_dir, tmp_path_factory.mktemp("oom") / "data", "--worker-memory-headroom-mb", "600"
    )
    s.start()
    try:
        yield s
    finally:
        s.stop()


def _workers(server: ServerProcess) -> dict[str, dict]:
    r = httpx.get(f"{server.base_url}/api/v1/workers", headers={"X-API-Key": API_KEY}, timeout=30)
    assert r.status_code == 200, r.text
    return {w["model"]: w for w in r.json()["workers"]}


def _wait_serving(server: ServerProcess, model: str, not_pid: int, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        w = _workers(server)[model]
        if w["state"] == "serving" and w.get("pid") != not_pid:
            return w
        time.sleep(0.5)
    raise AssertionError(f"worker of {model} did not come back: {_workers(server)[model]}")


def test_kill_9_worker_fails_its_futures_and_restarts(server: ServerProcess) -> None:
    sc = tinker.ServiceClient(base_url=server.base_url, api_key=API_KEY)
    model, other = server.model, server.other  # type: ignore[attr-defined]
    tc = sc.create_lora_training_client(base_model=model, rank=4, seed=3).result()
    tc.forward_backward([_datum()], "cross_entropy")
    tc.optim_step(ADAM).result()
    saved = tc.save_state("before-kill").result().path
    # What continuing from the checkpoint must give: one more step, then the loss.
    tc.forward_backward([_datum()], "cross_entropy")
    tc.optim_step(ADAM)
    expected = tc.forward([_datum()], "cross_entropy").result().metrics["loss:sum"]

    other_tc = sc.create_lora_training_client(base_model=other, rank=4).result()
    other_sampler = other_tc.save_weights_and_get_sampling_client("o")

    pid = _workers(server)[model]["pid"]
    assert pid != _workers(server)[other]["pid"]
    # In flight at the kill: a training op (long: 32 rows of 1024 tokens) and long samples.
    sampler = sc.create_sampling_client(base_model=model).result()
    long = [_datum(list(range(1, 1026))) for _ in range(32)]
    fb = tc.forward_backward(long, "cross_entropy")
    samples = [
        sampler.sample(
            types.ModelInput.from_ints([1, 2, 3]), 1, types.SamplingParams(max_tokens=1500, temperature=1.0)
        )
        for _ in range(3)
    ]
    time.sleep(1.0)
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    for fut in [fb, *samples]:
        with pytest.raises(tinker.RequestFailedError) as err:
            fut.result(timeout=60)
        assert err.value.category.value == "server", err.value
        assert "died" in str(err.value) and "SIGKILL" in str(err.value), err.value
    assert time.monotonic() - t0 < 30

    # The other model's worker serves while this one restarts.
    out = other_sampler.sample(
        types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=4)
    ).result()
    assert len(out.sequences[0].tokens) == 4

    _wait_serving(server, model, not_pid=pid)
    # The run that lived in the dead worker: a clear error naming the way back...
    with httpx.Client(
        base_url=server.base_url + "/api/v1", headers={"X-API-Key": API_KEY}, timeout=60
    ) as http:
        r = http.post("/optim_step", json={"model_id": tc.model_id, "seq_id": 99, "adam_params": {}})
        assert r.status_code == 404, r.text
        assert (
            "worker was lost" in r.json()["detail"]
            and "create_training_client_from_state" in r.json()["detail"]
        )
    # ... and continuing from its last checkpoint gives exactly what continuing would have.
    resumed = sc.create_training_client_from_state_with_optimizer(saved).result()
    resumed.forward_backward([_datum()], "cross_entropy")
    resumed.optim_step(ADAM)
    got = resumed.forward([_datum()], "cross_entropy").result().metrics["loss:sum"]
    assert got == pytest.approx(expected, rel=1e-5)
    fresh = sc.create_sampling_client(base_model=model).result()
    assert (
        len(
            fresh.sample(types.ModelInput.from_ints([1]), 1, types.SamplingParams(max_tokens=3))
            .result()
            .sequences[0]
            .tokens
        )
        == 3
    )


def test_out_of_memory_fails_one_request_and_the_worker_keeps_serving(capped_server: ServerProcess) -> None:
    server = capped_server
    sc = tinker.ServiceClient(base_url=server.base_url, api_key=API_KEY)
    model = server.model
    pid = _workers(server)[model]["pid"]
    tc = sc.create_lora_training_client(base_model=model, rank=4).result()
    # One 2047-token datum: its logits, log-softmax and their gradient are ~1.2 GB, past the 600 MB headroom.
    huge = _datum([(7 * i) % 40000 + 1 for i in range(2048)])
    with pytest.raises(tinker.RequestFailedError) as err:
        tc.forward_backward([huge], "cross_entropy").result(timeout=120)
    assert "out of memory" in str(err.value), err.value
    # Same process, still serving: the next op of the same run works.
    res = tc.forward_backward([_datum()], "cross_entropy").result(timeout=120)
    assert np.isfinite(res.metrics["loss:sum"])
    tc.optim_step(ADAM).result()
    assert _workers(server)[model]["pid"] == pid
