"""Bad input over the wire: every error is JSON `{"detail": ...}` naming the field (or a failed future with
category `user`), and the server keeps serving afterwards (invariant 6)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import tinker
from tinker import types

from tests.e2e.conftest import API_KEY, E2E_MAX_REQUEST_MB, ServerProcess

pytestmark = pytest.mark.slow

HEADERS = {"X-API-Key": API_KEY}


@pytest.fixture(scope="module")
def http(tinker_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=tinker_server.base_url + "/api/v1", headers=HEADERS, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def model(tinker_server: ServerProcess, http: httpx.Client) -> dict[str, str]:
    """A session and a LoRA model created over raw HTTP."""
    sid = http.post("/create_session", json={"tags": [], "user_metadata": {}, "sdk_version": "x"}).json()[
        "session_id"
    ]
    fut = http.post(
        "/create_model",
        json={
            "session_id": sid,
            "model_seq_id": 0,
            "base_model": tinker_server.model,
            "lora_config": {"rank": 4},
        },
    ).json()
    assert _result(http, fut["request_id"]) == {"model_id": fut["model_id"], "type": "create_model"}
    return {"session_id": sid, "model_id": fut["model_id"]}


def _result(http: httpx.Client, request_id: str) -> dict[str, object]:
    for _ in range(20):
        r = http.post("/retrieve_future", json={"request_id": request_id, "allow_metadata_only": False})
        if r.status_code != 408:
            assert r.status_code == 200, r.text
            return r.json()
    raise AssertionError("future never resolved")


def _still_serving(http: httpx.Client, model: dict[str, str], seq_id: int) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    fut = http.post(
        "/optim_step", json={"model_id": model["model_id"], "seq_id": seq_id, "adam_params": {}}
    ).json()
    assert "metrics" in _result(http, fut["request_id"])


def _detail(r: httpx.Response, status: int, field: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert field in r.json()["detail"]


def test_undecodable_protobuf(http: httpx.Client, model: dict[str, str]) -> None:
    r = http.post(
        "/forward_backward",
        content=b"\xff\xff\xff garbage",
        headers={"Content-Type": "application/x-protobuf"},
    )
    _detail(r, 400, "body")
    _still_serving(http, model, 1)


def test_json_errors_name_the_field(
    http: httpx.Client, model: dict[str, str], tinker_server: ServerProcess
) -> None:
    _detail(
        http.post("/optim_step", content=b"{not json", headers={"Content-Type": "application/json"}),
        400,
        "body",
    )
    _detail(http.post("/optim_step", json={"model_id": model["model_id"]}), 400, "seq_id")
    _detail(http.post("/optim_step", json={"model_id": "nope:train:0", "seq_id": 1}), 404, "model_id")
    _detail(
        http.post(
            "/asample",
            json={
                "sampling_session_id": "nope:sample:0",
                "seq_id": 0,
                "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1]}]},
                "sampling_params": {},
            },
        ),
        404,
        "sampling_session_id",
    )
    _detail(
        http.post(
            "/create_model",
            json={
                "session_id": model["session_id"],
                "model_seq_id": 5,
                "base_model": "not/served",
                "lora_config": {"rank": 4},
            },
        ),
        400,
        tinker_server.model,
    )  # the error lists what is served
    _detail(http.post("/weights_info", json={"tinker_path": "tinker://nope:train:0/weights/x"}), 404, "path")
    _detail(http.get("/training_runs/nope:train:0"), 404, "training_run_id")
    _detail(http.post("/retrieve_future", json={"request_id": "nope"}), 404, "request_id")
    _detail(http.post("/healthz"), 405, "")
    _detail(httpx.post(tinker_server.base_url + "/api/v1/create_session", json={}), 401, "X-API-Key")
    _still_serving(http, model, 2)


def test_oversize_request(tinker_server: ServerProcess, http: httpx.Client, model: dict[str, str]) -> None:
    # Announce a body far over the limit; the server must refuse before reading it.
    with socket.create_connection(("127.0.0.1", tinker_server.port)) as s:
        s.sendall(
            b"POST /api/v1/forward_backward HTTP/1.1\r\nHost: x\r\nX-API-Key: "
            + API_KEY.encode()
            + b"\r\nContent-Type: application/x-protobuf\r\nContent-Length: 999999999999\r\n\r\n"
        )
        raw = b""
        while b"\r\n\r\n" not in raw or b"}" not in raw.split(b"\r\n\r\n", 1)[1]:
            chunk = s.recv(4096)
            if not chunk:
                break
            raw += chunk
    head, _, body = raw.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 413"), head
    assert "body" in json.loads(body)["detail"]
    _still_serving(http, model, 3)


def test_oversize_chunked_request(
    tinker_server: ServerProcess, http: httpx.Client, model: dict[str, str]
) -> None:
    # No Content-Length: the body streams in chunks and is refused once it passes the limit.
    chunk = b"\0" * 2**20

    def body() -> Iterator[bytes]:
        for _ in range(E2E_MAX_REQUEST_MB + 2):
            yield chunk

    r = http.post("/forward_backward", content=body(), headers={"Content-Type": "application/x-protobuf"})
    assert "content-length" not in {k.lower() for k in r.request.headers}
    _detail(r, 413, "body")
    _still_serving(http, model, 4)


def test_invalid_sampling_and_too_long(tinker_server: ServerProcess) -> None:
    sc = tinker.ServiceClient(base_url=tinker_server.base_url, api_key=API_KEY)
    tc = sc.create_lora_training_client(base_model=tinker_server.model, rank=4).result()
    sampler = tc.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints([1, 2, 3])
    with pytest.raises(tinker.BadRequestError, match="sampling_params.temperature"):
        sampler.sample(prompt, 1, types.SamplingParams(max_tokens=2, temperature=-1.0)).result()
    ctx = sc.get_server_capabilities().supported_models[0].max_context_length
    assert ctx is not None
    with pytest.raises(tinker.BadRequestError, match="max_context_length"):
        sampler.sample(types.ModelInput.from_ints([1] * ctx), 1, types.SamplingParams(max_tokens=2)).result()
    long = types.Datum(
        model_input=types.ModelInput.from_ints([1] * (ctx + 1)),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=[1] * (ctx + 1), dtype="int64", shape=[ctx + 1])
        },
    )
    short = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2]),
        loss_fn_inputs={"target_tokens": types.TensorData(data=[2, 3], dtype="int64", shape=[2])},
    )
    # validated at the edge: a 400 naming the field, before any future exists
    with pytest.raises(tinker.BadRequestError, match=r"data\[0\]\.model_input: .*max_context_length"):
        tc.forward_backward([long], "cross_entropy").result()
    with pytest.raises(tinker.BadRequestError, match="loss_fn|stable_reinforce"):
        tc.forward_backward([short], "stable_reinforce").result()
    # The same client keeps working afterwards.
    assert len(sampler.sample(prompt, 1, types.SamplingParams(max_tokens=2)).result().sequences) == 1


def test_refused_ops_do_not_wedge_the_training_client(tinker_server: ServerProcess) -> None:
    """The SDK numbers every op and never resends one the server refused, so each refused op must still use
    its seq_id; otherwise every later op of the client waits forever for the missing one."""
    sc = tinker.ServiceClient(base_url=tinker_server.base_url, api_key=API_KEY)
    tc = sc.create_lora_training_client(base_model=tinker_server.model, rank=4).result()
    toks = [1, 5, 9, 13, 17]
    targets = {"target_tokens": types.TensorData.from_numpy(np.array(toks[1:], dtype=np.int64))}
    good = types.Datum(model_input=types.ModelInput.from_ints(toks[:-1]), loss_fn_inputs=targets)
    image = types.Datum(
        model_input=types.ModelInput(
            chunks=[types.ImageChunk(data=b"\x89PNG", format="png", expected_tokens=4)]
        ),
        loss_fn_inputs=targets,
    )
    # refused by the JSON route's validation, by the protobuf decoder, and by the checkpoint-name check
    with pytest.raises(tinker.BadRequestError, match="learning_rate"):
        tc.optim_step(types.AdamParams(learning_rate=-1.0)).result(timeout=60)
    with pytest.raises(tinker.BadRequestError, match=r"data\[0\]\.model_input\[0\].*text-only model"):
        tc.forward_backward([image], "cross_entropy").result(timeout=60)
    with pytest.raises(tinker.BadRequestError, match="path"):
        tc.save_state("../escape").result(timeout=60)
    out = tc.forward_backward([good], "cross_entropy").result(timeout=60)
    assert out.metrics["loss:sum"] > 0
    assert "metrics" in dir(tc.optim_step(types.AdamParams(learning_rate=1e-3)).result(timeout=60))


def test_finished_session_answers_410(http: httpx.Client, tinker_server: ServerProcess) -> None:
    sid = http.post("/create_session", json={}).json()["session_id"]
    assert http.post("/session_heartbeat", json={"session_id": sid}).status_code == 200
    assert http.post(f"/sessions/{sid}/finish", json={"reason": {"type": "success"}}).status_code == 200
    _detail(http.post("/session_heartbeat", json={"session_id": sid}), 410, "session_id")
    assert sid in http.get("/sessions", params={"status": "finished"}).json()["sessions"]
    assert sid not in http.get("/sessions", params={"status": "active"}).json()["sessions"]
