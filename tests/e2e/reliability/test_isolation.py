"""Every route × another owner's ids: 404 (never 500, never the data), table-driven over all routes that take
an id, and the owner's state untouched afterwards; traversal and injection in ids are refused (invariant 7)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from tinker.proto import tinker_public_pb2 as pb

from tests.e2e.conftest import ServerProcess
from tests.e2e.reliability.conftest import ALICE, BOB, World

pytestmark = pytest.mark.slow

# (name, method, path, body) built from the victim's world `v` and the caller's own world `me`.
Case = tuple[str, str, Callable[[World, World], str], Callable[[World, World], Any]]


def _fwdbwd(v: World, _me: World) -> bytes:
    msg = pb.ForwardBackwardRequest(model_id=v.model_id, seq_id=1000, loss_fn="cross_entropy")
    d = msg.data.add()
    d.model_input.add().encoded_text.tokens = b"\x01\x00\x00\x00\x02\x00\x00\x00"
    return msg.SerializeToString()


def _ckpt(v: World, path: str | None = None) -> str:
    run, kind, name = (path or v.weights_path).removeprefix("tinker://").split("/")
    return f"/api/v1/training_runs/{quote(run)}/checkpoints/{kind}/{name}"


CASES: list[Case] = [
    (
        "retrieve_future",
        "POST",
        lambda v, me: "/api/v1/retrieve_future",
        lambda v, me: {"request_id": v.request_id},
    ),
    (
        "retrieve_futures",
        "POST",
        lambda v, me: "/api/v1/retrieve_futures",
        lambda v, me: {
            "target": {"type": "sampling_session", "sampling_session_id": v.sampler_id},
            "timeout": 0,
        },
    ),
    (
        "create_model",
        "POST",
        lambda v, me: "/api/v1/create_model",
        lambda v, me: {"session_id": v.session_id, "model_seq_id": 77, "base_model": "x"},
    ),
    ("get_info", "POST", lambda v, me: "/api/v1/get_info", lambda v, me: {"model_id": v.model_id}),
    ("forward_backward", "POST", lambda v, me: "/api/v1/forward_backward", _fwdbwd),
    (
        "optim_step",
        "POST",
        lambda v, me: "/api/v1/optim_step",
        lambda v, me: {"model_id": v.model_id, "seq_id": 1000},
    ),
    (
        "create_sampling_session/session",
        "POST",
        lambda v, me: "/api/v1/create_sampling_session",
        lambda v, me: {
            "session_id": v.session_id,
            "sampling_session_seq_id": 77,
            "model_path": me.sampler_path,
        },
    ),
    (
        "create_sampling_session/model_path",
        "POST",
        lambda v, me: "/api/v1/create_sampling_session",
        lambda v, me: {
            "session_id": me.session_id,
            "sampling_session_seq_id": 78,
            "model_path": v.sampler_path,
        },
    ),
    ("get_sampler", "GET", lambda v, me: f"/api/v1/samplers/{quote(v.sampler_id)}", lambda v, me: None),
    (
        "asample",
        "POST",
        lambda v, me: "/api/v1/asample",
        lambda v, me: {
            "sampling_session_id": v.sampler_id,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]},
            "sampling_params": {"max_tokens": 1},
        },
    ),
    (
        "session_heartbeat",
        "POST",
        lambda v, me: "/api/v1/session_heartbeat",
        lambda v, me: {"session_id": v.session_id},
    ),
    ("get_session", "GET", lambda v, me: f"/api/v1/sessions/{v.session_id}", lambda v, me: None),
    ("finish_session", "POST", lambda v, me: f"/api/v1/sessions/{v.session_id}/finish", lambda v, me: None),
    (
        "save_weights",
        "POST",
        lambda v, me: "/api/v1/save_weights",
        lambda v, me: {"model_id": v.model_id, "seq_id": 1000, "path": "stolen"},
    ),
    (
        "save_weights_for_sampler",
        "POST",
        lambda v, me: "/api/v1/save_weights_for_sampler",
        lambda v, me: {"model_id": v.model_id, "seq_id": 1000, "path": "stolen"},
    ),
    (
        "save_weights_external",
        "POST",
        lambda v, me: "/api/v1/save_weights_external",
        lambda v, me: {"model_id": v.model_id, "seq_id": 1000, "path": "stolen"},
    ),
    (
        "load_weights/new",
        "POST",
        lambda v, me: "/api/v1/load_weights",
        lambda v, me: {"session_id": me.session_id, "model_seq_id": 79, "path": v.weights_path},
    ),
    (
        "load_weights/into",
        "POST",
        lambda v, me: "/api/v1/load_weights",
        lambda v, me: {"model_id": v.model_id, "seq_id": 1000, "path": me.weights_path},
    ),
    ("get_run", "GET", lambda v, me: f"/api/v1/training_runs/{quote(v.run_id)}", lambda v, me: None),
    (
        "run_checkpoints",
        "GET",
        lambda v, me: f"/api/v1/training_runs/{quote(v.run_id)}/checkpoints",
        lambda v, me: None,
    ),
    ("get_checkpoint", "GET", lambda v, me: _ckpt(v), lambda v, me: None),
    ("delete_checkpoint", "DELETE", lambda v, me: _ckpt(v), lambda v, me: None),
    ("publish", "POST", lambda v, me: _ckpt(v) + "/publish", lambda v, me: None),
    ("unpublish", "DELETE", lambda v, me: _ckpt(v) + "/publish", lambda v, me: None),
    ("ttl", "PUT", lambda v, me: _ckpt(v) + "/ttl", lambda v, me: {"ttl_seconds": 1}),
    (
        "external_urls",
        "GET",
        lambda v, me: _ckpt(v, v.external_path) + "/external_weights_urls",
        lambda v, me: None,
    ),
    (
        "weights_info",
        "POST",
        lambda v, me: "/api/v1/weights_info",
        lambda v, me: {"tinker_path": v.weights_path},
    ),
    (
        "copy_weights",
        "POST",
        lambda v, me: "/api/v1/copy_weights",
        lambda v, me: {"source_path": v.weights_path},
    ),
    ("openai_model", "GET", lambda v, me: f"/v1/models/{v.sampler_path}", lambda v, me: None),
    (
        "openai_completions",
        "POST",
        lambda v, me: "/v1/completions",
        lambda v, me: {"model": v.sampler_path, "prompt": "hi", "max_tokens": 1},
    ),
    (
        "openai_chat",
        "POST",
        lambda v, me: "/v1/chat/completions",
        lambda v, me: {
            "model": v.sampler_path,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 1,
        },
    ),
]


def _request(server: ServerProcess, key: str, method: str, path: str, body: Any) -> httpx.Response:
    head = {"X-API-Key": key, "Authorization": f"Bearer {key}"}
    if isinstance(body, bytes):
        head["Content-Type"] = "application/x-protobuf"
        return httpx.request(method, server.base_url + path, content=body, headers=head, timeout=60)
    return httpx.request(method, server.base_url + path, json=body, headers=head, timeout=60)


def _snapshot(server: ServerProcess, w: World) -> dict[str, Any]:
    head = {"X-API-Key": w.key}
    get = lambda p: httpx.get(server.base_url + p, headers=head, timeout=30).json()  # noqa: E731
    return {
        "run": get(f"/api/v1/training_runs/{quote(w.run_id)}"),
        "checkpoints": get(f"/api/v1/training_runs/{quote(w.run_id)}/checkpoints"),
        "session": get(f"/api/v1/sessions/{w.session_id}"),
    }


@pytest.fixture(scope="module")
def my_session(reliability_server: ServerProcess) -> str:
    """An active session of BOB's own for the requests that name one: the world's session may have been
    finished by a legitimate request of the route fuzzer (test_fuzz_routes) earlier in the run."""
    r = _request(reliability_server, BOB, "POST", "/api/v1/create_session", {})
    assert r.status_code == 200, r.text
    return r.json()["session_id"]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_another_owners_ids_are_not_found(
    reliability_server: ServerProcess, worlds: dict[str, World], my_session: str, case: Case
) -> None:
    name, method, path, body = case
    victim, me = worlds[ALICE], dataclasses.replace(worlds[BOB], session_id=my_session)
    before = _snapshot(reliability_server, victim)
    r = _request(reliability_server, me.key, method, path(victim, me), body(victim, me))
    assert r.status_code == 404, f"{name}: {r.status_code} {r.text[:300]}"
    body = r.json()  # an error and nothing else: no field of the victim's run, session or checkpoint
    assert list(body) in (["detail"], ["error"]), body
    assert "safetensors" not in r.text and "size_bytes" not in r.text
    assert _snapshot(reliability_server, victim) == before


def test_cancel_of_another_owners_request_is_a_no_op(
    reliability_server: ServerProcess, worlds: dict[str, World]
) -> None:
    r = _request(
        reliability_server, BOB, "POST", "/api/v1/cancel_future", {"request_id": worlds[ALICE].request_id}
    )
    assert r.status_code == 404 or r.json() == {"cancelled": False}


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/training_runs/..%2F..%2Fetc/checkpoints/weights/x",
        "/api/v1/training_runs/x/checkpoints/weights/..%2F..%2Ftreadle.db",
        "/api/v1/training_runs/x/checkpoints/weights/%2e%2e",
        "/api/v1/training_runs/x/checkpoints/ckpt0",
        "/api/v1/training_runs/x'%20OR%201=1--/checkpoints/weights/a",
        "/api/v1/blobs/9999999999.AAAA/..%2F..%2Ftreadle.db",
        "/api/v1/blobs/9999999999.AAAA/x/weights/a/../../../../treadle.db",
        "/api/v1/blobs/%C2%B2.AAAA/x/weights/a/adapter_config.json",
    ],
)
def test_traversal_and_injection_in_paths_are_refused(
    reliability_server: ServerProcess, worlds: dict[str, World], path: str
) -> None:
    r = httpx.get(reliability_server.base_url + path, headers={"X-API-Key": ALICE}, follow_redirects=True)
    assert r.status_code in (400, 404), r.text[:300]
    assert r.json()["detail"].split(":")[0] in (
        "checkpoint_id",
        "url",
        "path",
        "model_id",
        "run_id",
        "training_run_id",
    )
    assert b"SQLite" not in r.content


@pytest.mark.parametrize(
    "tinker_path",
    [
        "tinker://../../etc/weights/x",
        "tinker://run/weights/../../x",
        "tinker://run/weights/..",
        "tinker://run/../weights/x",
        "tinker://run/weights/x%00",
        "file:///etc/passwd",
    ],
)
def test_traversal_in_tinker_paths_is_refused(reliability_server: ServerProcess, tinker_path: str) -> None:
    r = httpx.post(
        reliability_server.base_url + "/api/v1/weights_info",
        json={"tinker_path": tinker_path},
        headers={"X-API-Key": ALICE},
    )
    assert r.status_code in (400, 404) and r.json()["detail"].startswith("tinker_path:"), r.text[:300]


def test_signed_download_urls_cannot_be_altered(
    reliability_server: ServerProcess, worlds: dict[str, World]
) -> None:
    w = worlds[ALICE]
    r = httpx.get(
        reliability_server.base_url + _ckpt(w, w.external_path) + "/external_weights_urls",
        headers={"X-API-Key": w.key},
    )
    urls = r.raise_for_status().json()["urls"]
    url = next(iter(urls.values()))
    assert httpx.get(url).status_code == 200
    token = url.split("/blobs/")[1].split("/")[0]
    exp, mac = token.split(".")
    altered = [
        url.replace(token, f"{int(exp) + 1}.{mac}"),  # a later expiry
        url.replace(token, f"{exp}.{mac[::-1]}"),  # another signature
        url.replace("adapter_config.json", "adapter_model.safetensors")
        if "adapter_config" in url
        else url + "x",
        url.replace(w.run_id, worlds[BOB].run_id),  # another owner's run under the same token
    ]
    for bad in altered:
        r = httpx.get(bad)
        assert r.status_code == 404 and r.json()["detail"].startswith("url:"), (bad, r.text[:200])


def test_keys_are_never_logged(reliability_server: ServerProcess, worlds: dict[str, World]) -> None:
    r = httpx.get(
        reliability_server.base_url + "/api/v1/sessions", headers={"X-API-Key": "tml-wrong-key-123"}
    )
    assert r.status_code == 401 and "tml-wrong" not in r.text
    log = reliability_server.log()
    assert ALICE not in log and BOB not in log and "tml-wrong" not in log
