"""Restart on the same data dir after a crash (SIGKILL): runs and checkpoints are still listed, resuming
with optimizer state reproduces the next-step loss, a future in flight at the crash resolves with an
error of category `server` instead of hanging (invariant 4), and a finished future answers with the same bytes
as before the crash (JSON, and the protobuf of a forward_backward and of a sample, read back from the store)."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import numpy as np
import pytest
import sqlalchemy as sa
import tinker
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto

from tests.e2e.conftest import API_KEY, ServerProcess
from treadle.store.db import metadata

pytestmark = pytest.mark.slow

TOKENS = [1, 17, 42, 99, 7, 300, 12, 5]
ADAM = types.AdamParams(learning_rate=1e-2)


def _datum() -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(TOKENS[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData.from_numpy(np.array(TOKENS[1:], dtype=np.int64)),
            "weights": types.TensorData.from_numpy(np.ones(len(TOKENS) - 1, dtype=np.float32)),
        },
    )


def _answer(http: httpx.Client, request_id: str) -> tuple[str, bytes]:
    """A finished future's retrieve_future answer: (content type, body bytes)."""
    for _ in range(20):
        r = http.post("/retrieve_future", json={"request_id": request_id})
        if r.status_code != 408:
            assert r.status_code == 200 and b'"error"' not in r.content, r.text
            return r.headers["content-type"], r.content
    raise AssertionError("future never resolved")


def _finished_futures(http: httpx.Client, model: str) -> list[str]:
    """One future of each stored shape: create_model (JSON), forward_backward and a sample (protobuf)."""
    sid = http.post("/create_session", json={}).json()["session_id"]
    made = http.post(
        "/create_model",
        json={"session_id": sid, "model_seq_id": 0, "base_model": model, "lora_config": {"rank": 4}},
    ).json()
    _answer(http, made["request_id"])  # the model exists once its create resolves
    fb = types.ForwardBackwardRequest(
        model_id=made["model_id"],
        seq_id=1,
        forward_backward_input=types.ForwardBackwardInput(data=[_datum()], loss_fn="cross_entropy"),
    )
    fb_rid = http.post(
        "/forward_backward",
        content=forward_backward_request_to_proto(fb).SerializeToString(),
        headers={"Content-Type": "application/x-protobuf"},
    ).json()["request_id"]
    sampler = http.post(
        "/create_sampling_session",
        json={"session_id": sid, "sampling_session_seq_id": 0, "base_model": model},
    ).json()["sampling_session_id"]
    sample_rid = http.post(
        "/asample",
        json={
            "sampling_session_id": sampler,
            "seq_id": 0,
            "num_samples": 2,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": TOKENS}]},
            "sampling_params": {"max_tokens": 3, "seed": 1},
            "topk_prompt_logprobs": 2,
            "topk_sample_logprobs": 2,
        },
    ).json()["request_id"]
    return [made["request_id"], fb_rid, sample_rid]


@pytest.fixture(params=["sqlite", "postgres"])
def db_args(request: pytest.FixtureRequest) -> tuple[str, ...]:
    """The default SQLite file in the data dir, and a real PostgreSQL server when CI provides one."""
    if request.param == "sqlite":
        return ()
    url = os.environ.get("TREADLE_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("set TREADLE_TEST_POSTGRES_URL to run the restart test on PostgreSQL")
    engine = sa.create_engine(url)
    metadata.drop_all(engine)
    engine.dispose()
    return ("--db-url", url)


def test_crash_restart_resume(e2e_model_dir: Path, tmp_path: Path, db_args: tuple[str, ...]) -> None:
    server = ServerProcess(e2e_model_dir, tmp_path / "data", *db_args)
    server.start()
    try:
        sc = tinker.ServiceClient(base_url=server.base_url, api_key=API_KEY)
        tc = sc.create_lora_training_client(
            base_model=server.model, rank=4, seed=2, user_metadata={"renderer_name": "role_colon"}
        ).result()
        run_id = tc.model_id
        tc.forward_backward([_datum()], "cross_entropy")
        tc.optim_step(ADAM).result()
        state = tc.save_state("000001").result().path
        # What continuing would have given: one more step, then the loss.
        tc.forward_backward([_datum()], "cross_entropy")
        tc.optim_step(ADAM)
        continued = tc.forward([_datum()], "cross_entropy").result().metrics["loss:sum"]

        # A submission whose predecessor (seq_id 999) never arrives stays in flight until the crash.
        with httpx.Client(
            base_url=server.base_url + "/api/v1", headers={"X-API-Key": API_KEY}, timeout=60
        ) as http:
            finished = _finished_futures(http, server.model)
            before = [_answer(http, rid) for rid in finished]
            assert [ctype for ctype, _ in before] == ["application/json"] + ["application/x-protobuf"] * 2
            stuck = http.post(
                "/optim_step", json={"model_id": run_id, "seq_id": 1000, "adam_params": {}}
            ).json()
    finally:
        server.stop(kill=True)

    server.start()  # same port, same data dir
    try:
        with httpx.Client(
            base_url=server.base_url + "/api/v1", headers={"X-API-Key": API_KEY}, timeout=60
        ) as http:
            r = http.post("/retrieve_future", json={"request_id": stuck["request_id"]})
            assert (
                r.status_code == 200 and r.json()["category"] == "server" and "restarted" in r.json()["error"]
            )
            assert [_answer(http, rid) for rid in finished] == before

        rest = tinker.RestClient(base_url=server.base_url, api_key=API_KEY)
        run = rest.get_training_run(run_id).result()
        assert run.user_metadata == {"renderer_name": "role_colon"}
        assert [c.tinker_path for c in rest.list_checkpoints(run_id).result().checkpoints] == [state]

        sc = tinker.ServiceClient(base_url=server.base_url, api_key=API_KEY)
        resumed = sc.create_training_client_from_state_with_optimizer(state).result()
        resumed.forward_backward([_datum()], "cross_entropy")
        resumed.optim_step(ADAM)
        assert resumed.forward([_datum()], "cross_entropy").result().metrics["loss:sum"] == pytest.approx(
            continued, rel=1e-5
        )
        # The old model id is not loaded after the restart: a clear error naming the way back, not a hang.
        with httpx.Client(
            base_url=server.base_url + "/api/v1", headers={"X-API-Key": API_KEY}, timeout=60
        ) as http:
            r = http.post("/optim_step", json={"model_id": run_id, "seq_id": 3, "adam_params": {}})
            assert r.status_code == 404 and "create_training_client_from_state" in r.json()["detail"]
    finally:
        server.stop()
