"""Connection-level hostile input over a real socket (stalled, truncated, trickled bodies; lying or malformed
Content-Length and chunking; garbage request lines) and the backpressure limits (sessions and resident runs per
key, sampling tokens in flight), against a server started with tight limits. Every case gets an HTTP answer or
a clean close, the server keeps serving, and nothing is logged as an unhandled error."""

from __future__ import annotations

import concurrent.futures as cf
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import tinker
from tinker import types

from tests.e2e.conftest import ServerProcess

pytestmark = pytest.mark.slow

KEY = "tml-tight"
BODY_TIMEOUT_S = 1.5


@pytest.fixture(scope="module")
def tight(e2e_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(
        e2e_model_dir,
        tmp_path_factory.mktemp("tight") / "data",
        "--api-key",
        KEY,
        "--body-timeout",
        str(BODY_TIMEOUT_S),
        "--max-sessions-per-key",
        "3",
        "--max-runs-per-key",
        "2",
        "--max-sample-tokens",
        "40",
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _exchange(port: int, raw: bytes, *, half_close: bool = False, pause_s: float = 0.0) -> bytes:
    """Send raw bytes, read until the server closes or goes quiet; b'' means closed without an answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=BODY_TIMEOUT_S + 10) as s:
        s.sendall(raw)
        if pause_s:
            time.sleep(pause_s)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        out = b""
        s.settimeout(BODY_TIMEOUT_S + 5)
        try:
            while chunk := s.recv(65536):
                out += chunk
                if b"\r\n\r\n" in out and _complete(out):
                    break
        except TimeoutError:
            pass
        return out


def _complete(resp: bytes) -> bool:
    head, _, body = resp.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return True


def _status(resp: bytes) -> int:
    assert resp.startswith(b"HTTP/1.1 "), resp[:200]
    return int(resp[9:12])


def _post(path: str, body: bytes, extra: str = "", length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    head = (
        f"POST /api/v1/{path} HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {n}\r\n{extra}\r\n"
    )
    return head.encode() + body


def test_stalled_body_is_answered_408_naming_the_body(tight: ServerProcess) -> None:
    t0 = time.monotonic()
    resp = _exchange(tight.port, _post("create_session", b'{"tags"', length=100))
    assert _status(resp) == 408 and b'"detail":"body: no part of the request body arrived' in resp
    assert time.monotonic() - t0 < BODY_TIMEOUT_S + 5


def test_trickled_body_within_the_timeout_is_served(tight: ServerProcess) -> None:
    body = b'{"tags": ["slow"], "user_metadata": {}}'
    with socket.create_connection(("127.0.0.1", tight.port), timeout=30) as s:
        s.sendall(_post("create_session", b"", length=len(body)))
        for i in range(0, len(body), 8):
            s.sendall(body[i : i + 8])
            time.sleep(BODY_TIMEOUT_S / 5)
        resp = s.recv(65536)
    assert _status(resp) == 200 and b"session_id" in resp
    sid = json.loads(resp.partition(b"\r\n\r\n")[2])["session_id"]
    # Give the slot back: this server allows 3 active sessions per key.
    httpx.post(
        f"{tight.base_url}/api/v1/sessions/{sid}/finish", headers={"X-API-Key": KEY}
    ).raise_for_status()


@pytest.mark.parametrize(
    "raw",
    [
        b"POST /api/v1/create_session HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",
        b"POST /api/v1/create_session HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{}",
        b"POST /api/v1/create_session HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        b"POST /api/v1/create_session HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
        b"POST /api/v1/create_session HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked, x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 garbage as if TLS\r\n\r\n",
        b"GET " + b"/a" * 40000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /api/v1/healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"y" * 200_000 + b"\r\n\r\n",
    ],
    ids=[
        "cl-text",
        "cl-negative",
        "cl-twice",
        "bad-chunk",
        "bad-te",
        "tls",
        "long-line",
        "huge-header",
    ],
)
def test_malformed_framing_gets_a_4xx(tight: ServerProcess, raw: bytes) -> None:
    resp = _exchange(tight.port, raw)
    assert 400 <= _status(resp) < 500, resp[:300]


def test_truncated_body_then_close_leaves_the_server_serving(tight: ServerProcess) -> None:
    resp = _exchange(tight.port, _post("create_session", b'{"ta', length=50), half_close=True)
    assert resp == b"" or 400 <= _status(resp) < 500
    assert httpx.get(f"{tight.base_url}/api/v1/healthz").status_code == 200


def test_content_length_shorter_than_the_body(tight: ServerProcess) -> None:
    # The server reads what was declared: a JSON error naming the body, then the leftover bytes are refused
    # as a malformed next request on the same connection.
    resp = _exchange(tight.port, _post("create_session", b'{"tags": []}', length=5))
    assert _status(resp) == 400 and b'"detail":"body: not valid JSON' in resp


def test_the_server_logged_no_unhandled_error(tight: ServerProcess) -> None:
    assert httpx.get(f"{tight.base_url}/api/v1/healthz").status_code == 200
    assert "Traceback" not in tight.log() and "unhandled error" not in tight.log()


def _session(base: str) -> httpx.Response:
    return httpx.post(f"{base}/api/v1/create_session", json={}, headers={"X-API-Key": KEY})


def test_sessions_per_key_limit_answers_429_and_frees_on_finish(tight: ServerProcess) -> None:
    base = tight.base_url
    listed = httpx.get(f"{base}/api/v1/sessions?status=active&limit=100", headers={"X-API-Key": KEY})
    ids = listed.json()["sessions"]
    while len(ids) < 3:
        ids.append(_session(base).raise_for_status().json()["session_id"])
    refused = _session(base)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "2"
    assert refused.json()["detail"].startswith("sessions: this API key has 3 active sessions, the limit is 3")
    for sid in ids:
        httpx.post(f"{base}/api/v1/sessions/{sid}/finish", headers={"X-API-Key": KEY}).raise_for_status()
    assert _session(base).status_code == 200


def test_runs_per_key_limit_queues_the_sdk_until_room_frees(tight: ServerProcess) -> None:
    svc = tinker.ServiceClient(base_url=tight.base_url, api_key=KEY)
    first = svc.create_lora_training_client(base_model=tight.model, rank=4).result()
    svc.create_lora_training_client(base_model=tight.model, rank=4).result()
    session_id = first.model_id.rsplit(":train:", 1)[0]
    r = httpx.post(
        f"{tight.base_url}/api/v1/create_model",
        json={"session_id": session_id, "model_seq_id": 50, "base_model": tight.model},
        headers={"X-API-Key": KEY},
    )
    assert r.status_code == 429 and r.json()["detail"].startswith("training_runs: this API key holds 2")

    # A second client's create waits (the SDK retries the 429 after Retry-After) until the first client's
    # session finishes and frees its two runs; then it succeeds.
    def finish_later() -> None:
        time.sleep(3)
        httpx.post(
            f"{tight.base_url}/api/v1/sessions/{session_id}/finish", headers={"X-API-Key": KEY}
        ).raise_for_status()

    t = threading.Thread(target=finish_later)
    t.start()
    other = tinker.ServiceClient(base_url=tight.base_url, api_key=KEY)
    tc = other.create_lora_training_client(base_model=tight.model, rank=4).result()
    t.join()
    assert tc.model_id


def test_sampling_tokens_in_flight_queue_instead_of_failing(tight: ServerProcess) -> None:
    svc = tinker.ServiceClient(base_url=tight.base_url, api_key=KEY)
    sc = svc.create_sampling_client(base_model=tight.model).result()
    prompt = types.ModelInput.from_ints([1, 2, 3, 4])
    params = types.SamplingParams(max_tokens=16, temperature=1.0, seed=1)
    # Each request holds 2 × (4 + 16) = 40 tokens, the whole server limit: they run one at a time.
    with cf.ThreadPoolExecutor(6) as ex:
        futs = [ex.submit(lambda: sc.sample(prompt, 2, params).result()) for _ in range(6)]
        results = [f.result(timeout=180) for f in futs]
    assert all(len(r.sequences) == 2 for r in results)
