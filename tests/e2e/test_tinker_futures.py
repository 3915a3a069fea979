"""Futures over raw HTTP: a retried sample (same sampler, same seq_id) maps to the same future, and the
`retrieve_futures` session poller reports completions behind a cursor."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.conftest import API_KEY, ServerProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def http(tinker_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=tinker_server.base_url + "/api/v1", headers={"X-API-Key": API_KEY}, timeout=60
    ) as c:
        yield c


def _sample(http: httpx.Client, sampler: str, seq_id: int) -> dict[str, object]:
    body = {
        "sampling_session_id": sampler,
        "seq_id": seq_id,
        "num_samples": 2,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
        "sampling_params": {"max_tokens": 2, "seed": seq_id},
    }
    r = http.post("/asample", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_dedupe_and_session_poller(http: httpx.Client, tinker_server: ServerProcess) -> None:
    sid = http.post("/create_session", json={}).json()["session_id"]
    sampler = http.post(
        "/create_sampling_session",
        json={
            "session_id": sid,
            "sampling_session_seq_id": 0,
            "base_model": tinker_server.model,
        },
    ).json()["sampling_session_id"]
    assert sampler == f"{sid}:sample:0"
    first = _sample(http, sampler, 0)
    assert _sample(http, sampler, 0)["request_id"] == first["request_id"]  # a retry, not a new request
    assert len(first["sample_sequence_ids"]) == 2  # type: ignore[arg-type]
    second = _sample(http, sampler, 1)

    seen: set[str] = set()
    cursor = 0
    while len(seen) < 2:
        r = http.post(
            "/retrieve_futures",
            json={
                "target": {
                    "type": "sampling_session",
                    "sampling_session_id": sampler,
                    "cloned_sampler_id": 0,
                },
                "prev_cursor": cursor,
                "timeout": 30,
                "retrieved_request_ids": [],
            },
        ).json()
        assert r["cursor"] >= cursor
        cursor = r["cursor"]
        seen |= {c["request_id"] for c in r["completions"] if c["state"] == "finished"}
    assert seen == {first["request_id"], second["request_id"]}
    r = http.post(
        "/retrieve_futures",
        json={
            "target": {"type": "sampling_session", "sampling_session_id": sampler},
            "prev_cursor": cursor,
            "timeout": 0,
        },
    ).json()
    assert r == {"completions": [], "cursor": cursor}
    assert http.post("/cancel_future", json={"request_id": first["request_id"]}).status_code == 200
    r2 = http.post("/retrieve_future", json={"request_id": first["request_id"], "allow_metadata_only": True})
    assert r2.status_code == 200 and r2.headers["content-type"] == "application/x-protobuf"


def test_cancel_future_stops_a_sampling_request(http: httpx.Client, tinker_server: ServerProcess) -> None:
    sid = http.post("/create_session", json={}).json()["session_id"]
    sampler = http.post(
        "/create_sampling_session",
        json={"session_id": sid, "sampling_session_seq_id": 0, "base_model": tinker_server.model},
    ).json()["sampling_session_id"]
    body = {
        "sampling_session_id": sampler,
        "seq_id": 0,
        "num_samples": 1,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
        # long enough that it is still generating when the cancel arrives; stop=[] so it cannot end early
        "sampling_params": {"max_tokens": 2000, "seed": 0, "stop": []},
    }
    rid = http.post("/asample", json=body).json()["request_id"]
    assert http.post("/cancel_future", json={"request_id": rid}).status_code == 200
    r = http.post("/retrieve_future", json={"request_id": rid, "allow_metadata_only": False})
    while r.status_code == 408:
        r = http.post("/retrieve_future", json={"request_id": rid, "allow_metadata_only": False})
    assert r.status_code == 200
    assert r.json()["category"] == "user" and "cancelled" in r.json()["error"]
    # another user's cancel is a no-op, and the server keeps serving
    assert http.post("/cancel_future", json={"request_id": "no-such-request"}).json() == {"cancelled": False}
    body2 = dict(body, seq_id=1, sampling_params={"max_tokens": 2, "seed": 0})
    rid2 = http.post("/asample", json=body2).json()["request_id"]
    r2 = http.post("/retrieve_future", json={"request_id": rid2, "allow_metadata_only": False})
    while r2.status_code == 408:
        r2 = http.post("/retrieve_future", json={"request_id": rid2, "allow_metadata_only": False})
    assert r2.status_code == 200 and r2.headers["content-type"].startswith("application/x-protobuf")
