"""Backpressure instead of collapse, against a real `treadle serve` with a tiny sampling-token budget (40): work
over the budget queues with a visible reason instead of failing. Official-SDK samples all complete while a raw
`retrieve_future` poll of a queued sample sees 408 `queue_state: "paused_capacity"` and the reason; a key's
queue is bounded (429 naming the flag), a queued sample can be cancelled, and ending its session fails the
rest cleanly; concurrent OpenAI requests over the budget all complete or get a 429 naming the limit, never a
5xx; afterwards nothing is left holding tokens."""

from __future__ import annotations

import concurrent.futures as cf
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import tinker
from openai.types.chat import ChatCompletionMessageParam
from tinker import types

from tests.e2e.conftest import ServerProcess

pytestmark = pytest.mark.slow

KEY = "tml-backpressure"
HEAD = {"X-API-Key": KEY}
QUEUE_CAP = 6
BLOCKER_TOKENS = 1000  # one sample this long holds the whole budget for a few seconds on the tiny model


@pytest.fixture(scope="module")
def server(e2e_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(
        e2e_model_dir,
        tmp_path_factory.mktemp("backpressure") / "data",
        "--api-key",
        KEY,
        "--max-sample-tokens",
        "40",
        "--max-queued-per-key",
        str(QUEUE_CAP),
        "--queue-wait-s",
        "20",
    )
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
    assert "Traceback" not in srv.log() and "unhandled error" not in srv.log()


def _post(server: ServerProcess, path: str, body: dict[str, Any], timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{server.base_url}/api/v1/{path}", json=body, headers=HEAD, timeout=timeout)


def _sampler(server: ServerProcess) -> tuple[str, str]:
    """A fresh session and a base-model sampler in it (plain HTTP: the SDK keeps these ids private)."""
    session_id = _post(server, "create_session", {}).raise_for_status().json()["session_id"]
    body = {"session_id": session_id, "sampling_session_seq_id": 0, "base_model": server.model}
    sampler_id = (
        _post(server, "create_sampling_session", body).raise_for_status().json()["sampling_session_id"]
    )
    return session_id, sampler_id


def _asample(server: ServerProcess, sampler_id: str, seq_id: int, max_tokens: int) -> httpx.Response:
    return _post(
        server,
        "asample",
        {
            "sampling_session_id": sampler_id,
            "seq_id": seq_id,
            "num_samples": 1,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3, 4]}]},
            "sampling_params": {"max_tokens": max_tokens, "temperature": 1.0, "seed": seq_id},
        },
    )


def _poll(server: ServerProcess, request_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Poll retrieve_future until it resolves: (the final body, every 408 body seen on the way)."""
    waits: list[dict[str, Any]] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        r = _post(server, "retrieve_future", {"request_id": request_id})
        assert r.status_code in (200, 408), r.text
        if r.status_code == 200:
            return (r.json() if r.headers["content-type"].startswith("application/json") else {}), waits
        waits.append(r.json())
    raise AssertionError(f"{request_id} never resolved")


def test_sdk_samples_queue_with_a_visible_reason_and_all_complete(server: ServerProcess) -> None:
    _, sampler_id = _sampler(server)
    blocker = _asample(server, sampler_id, 0, BLOCKER_TOKENS).raise_for_status().json()["request_id"]
    probe = _asample(server, sampler_id, 1, 16).raise_for_status().json()["request_id"]  # accepted, queued

    svc = tinker.ServiceClient(base_url=server.base_url, api_key=KEY)
    sc = svc.create_sampling_client(base_model=server.model).result()
    prompt = types.ModelInput.from_ints([1, 2, 3, 4])
    params = types.SamplingParams(max_tokens=16, temperature=1.0, seed=1)
    # Each holds 2 × (4 + 16) = 40 tokens, the whole budget: they queue and run one at a time.
    with cf.ThreadPoolExecutor(QUEUE_CAP - 1) as ex:
        futs = [ex.submit(lambda: sc.sample(prompt, 2, params).result()) for _ in range(QUEUE_CAP - 1)]
        probe_result, waits = _poll(server, probe)
        results = [f.result(timeout=180) for f in futs]
    assert all(len(r.sequences) == 2 for r in results)  # 0 errors
    assert "error" not in probe_result and "error" not in _poll(server, blocker)[0]
    paused = [w for w in waits if w["queue_state"] == "paused_capacity"]
    assert paused, f"no poll saw the queue: {waits}"
    reason = paused[0]["queue_state_reason"]
    assert reason.startswith("sampling: queued for room: ") and "sampling tokens are in flight" in reason
    assert "(--max-sample-tokens) and this request needs 20" in reason


def test_queue_bound_cancel_and_session_end_leave_nothing_held(server: ServerProcess) -> None:
    session_id, sampler_id = _sampler(server)
    blocker = _asample(server, sampler_id, 0, BLOCKER_TOKENS).raise_for_status().json()["request_id"]
    queued = [
        _asample(server, sampler_id, i, 16).raise_for_status().json()["request_id"] for i in range(1, 7)
    ]
    refused = _asample(server, sampler_id, 7, 16)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "2"
    assert refused.json()["detail"] == (
        f"sampling: this API key has {QUEUE_CAP} sampling requests queued for room, the limit is {QUEUE_CAP} "
        "(--max-queued-per-key); wait for some to finish"
    )
    assert _post(server, "cancel_future", {"request_id": queued[0]}).json() == {"cancelled": True}
    cancelled, _ = _poll(server, queued[0])
    assert cancelled == {"error": "request_id: the request was cancelled (cancel_future)", "category": "user"}

    httpx.post(f"{server.base_url}/api/v1/sessions/{session_id}/finish", headers=HEAD).raise_for_status()
    for rid in queued[1:]:
        body, _ = _poll(server, rid)
        assert body["category"] == "user"
        assert body["error"].startswith("request_id: the session finished while this sample was queued")
    _poll(server, blocker)  # resolves one way or the other; then nothing may still hold tokens
    _, fresh = _sampler(server)
    rid = _asample(server, fresh, 0, 16).raise_for_status().json()["request_id"]
    body, waits = _poll(server, rid)
    assert "error" not in body and not [w for w in waits if w["queue_state"] == "paused_capacity"]


def test_concurrent_openai_requests_over_the_budget_complete_or_429(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=KEY, max_retries=0)
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Count to ten."}]

    def one(i: int) -> str:
        try:
            if i % 2:
                stream = client.chat.completions.create(
                    model=server.model,
                    messages=messages,
                    max_tokens=24,
                    n=2,
                    stream=True,
                )
                return "ok" if sum(1 for _ in stream) > 0 else "empty"
            r = client.completions.create(model=server.model, prompt="one two", max_tokens=24, n=2)
            return "ok" if len(r.choices) == 2 else "short"
        except openai.RateLimitError as e:
            # waited --queue-wait-s for room under --max-sample-tokens, or the key's queue was full
            msg = str(e)
            assert "Error code: 429 - sampling: " in msg, msg
            assert ("--queue-wait-s" in msg and "--max-sample-tokens" in msg) or "--max-queued-per-key" in msg
            return "429"

    with cf.ThreadPoolExecutor(8) as ex:
        outcomes = list(ex.map(one, range(8)))
    assert set(outcomes) <= {"ok", "429"} and outcomes.count("ok") >= 1, outcomes
