"""Deployments end to end: a real `treadle serve` (tiny model, deterministic, two API keys), a sampler checkpoint
made with the official SDK, the `openai` client calling `model=<deployment>`, and the deployment/trace/feedback
REST API over HTTP. Traces are token-exact (the trainer's logprobs on the recorded ids equal the recorded ones),
everything is owner-scoped, refusals change nothing, and traces and the live version survive a restart (which
also turns on count retention)."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tinker
from openai import NotFoundError, OpenAI
from tinker import types

from tests.e2e.conftest import ServerProcess
from treadle.cli import main

pytestmark = pytest.mark.slow

ALICE, BOB = "tml-alice", "tml-bob"


@pytest.fixture(scope="module")
def server(e2e_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    s = ServerProcess(
        e2e_model_dir,
        tmp_path_factory.mktemp("deploy") / "server",
        "--deterministic",
        "--api-key",
        ALICE,
        "--api-key",
        BOB,
    )
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def trained(server: ServerProcess) -> tuple[Any, list[str]]:
    """Alice's training client and two sampler checkpoints of it (after 0 and 2 steps)."""
    sc = tinker.ServiceClient(base_url=server.base_url, api_key=ALICE)
    tc = sc.create_lora_training_client(base_model=server.model, rank=4, seed=0).result()
    first = tc.save_weights_for_sampler("v1").result().path
    toks = [5, 17, 33, 2, 9, 41, 7, 3]
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(toks[:-1]),
        loss_fn_inputs={"target_tokens": types.TensorData.from_numpy(np.array(toks[1:], dtype=np.int64))},
    )
    for _ in range(2):
        tc.forward_backward([datum], "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=5e-2))
    second = tc.save_weights_for_sampler("v2").result().path
    return tc, [first, second]


def _api(server: ServerProcess, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, headers={"X-API-Key": key}, timeout=60)


def test_deploy_serve_trace_feedback(server: ServerProcess, trained: tuple[Any, list[str]]) -> None:
    tc, (v1, v2) = trained
    alice, bob = _api(server, ALICE), _api(server, BOB)
    made = alice.post("/api/v1/deployments", json={"name": "helper", "model_path": v1})
    assert made.status_code == 201, made.text
    assert (made.json()["version"], made.json()["model_path"]) == (1, v1)
    assert alice.post("/api/v1/deployments", json={"name": "helper", "model_path": v1}).status_code == 409

    client = OpenAI(base_url=server.base_url + "/v1", api_key=ALICE)
    msgs: Any = [{"role": "user", "content": "What is two plus two?"}]
    raw = client.chat.completions.with_raw_response.create(
        model="helper",
        messages=msgs,
        max_tokens=6,
        temperature=0,
        user="u-7",
        extra_body={"session_id": "conv-1"},
    )
    assert raw.headers["X-Treadle-Deployment-Version"] == "1"
    assert raw.headers["X-Treadle-Deployment"] == "helper"
    reply = raw.parse()
    trace = alice.get(f"/api/v1/traces/{reply.id}").json()
    assert (trace["deployment"], trace["version"], trace["model_path"], trace["endpoint"]) == (
        "helper",
        1,
        v1,
        "chat",
    )
    assert (trace["user"], trace["session_id"], trace["request"]["messages"]) == ("u-7", "conv-1", msgs)
    # The prompt ids are the chat template's render; the completion ids decode to the reply.
    tok = tc.get_tokenizer()
    rendered = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert trace["prompt_tokens"] == tok.encode(rendered, add_special_tokens=False)
    assert (
        tok.decode(trace["completion_tokens"], skip_special_tokens=True) == reply.choices[0].message.content
    )
    assert len(trace["completion_logprobs"]) == len(trace["completion_tokens"]) > 0
    assert set(trace["timings"]) == {"queued_s", "prefill_s", "total_s"}
    # Token-exact: the trainer, on the recorded ids with v1's weights (deterministic mode), gives the
    # recorded logprobs bit for bit, so training on a trace needs no re-tokenization.
    ids = trace["prompt_tokens"] + trace["completion_tokens"]
    n = len(trace["prompt_tokens"])
    sampler = (
        tinker.ServiceClient(base_url=server.base_url, api_key=ALICE)
        .create_sampling_client(model_path=v1)
        .result()
    )
    scored = sampler.compute_logprobs(types.ModelInput.from_ints(ids)).result()
    assert np.array_equal(
        np.array(scored[n:], dtype=np.float32), np.array(trace["completion_logprobs"], dtype=np.float32)
    )

    # Streaming: the version header comes first, the trace is stored before the stream ends.
    stream = client.completions.with_raw_response.create(
        model="helper", prompt="Hello", max_tokens=4, stream=True
    )
    assert stream.headers["X-Treadle-Deployment-Version"] == "1"
    sid = {c.id for c in stream.parse()}
    assert len(sid) == 1
    streamed = alice.get(f"/api/v1/traces/{sid.pop()}").json()
    assert streamed["endpoint"] == "completions" and streamed["prompt_tokens"] == tok.encode("Hello")
    # n > 1: one trace per choice, `<id>` and `<id>-1`.
    two = client.completions.create(model="helper", prompt="Hi", max_tokens=3, n=2, seed=1)
    assert alice.get(f"/api/v1/traces/{two.id}-1").status_code == 200

    # Feedback: stored with the trace, idempotent, validated, owner-scoped.
    fb = {"completion_id": reply.id, "reward": 0.75, "rating": 1, "idempotency_key": "fb-1"}
    first = alice.post("/v1/feedback", json=fb)
    assert first.status_code == 201, first.text
    again = alice.post("/v1/feedback", json=fb)
    assert again.status_code == 200 and again.json() == first.json()
    bad = alice.post("/v1/feedback", json={"completion_id": reply.id, "reward": float("1e7")})
    assert bad.status_code == 400 and bad.json()["detail"].startswith("reward:")
    assert bob.post("/v1/feedback", json={"completion_id": reply.id, "rating": 1}).status_code == 404
    listed = alice.get("/api/v1/traces", params={"deployment": "helper", "has_feedback": "true"}).json()
    assert [t["completion_id"] for t in listed["traces"]] == [reply.id]
    assert listed["traces"][0]["feedback"][0]["reward"] == 0.75
    page = alice.get("/api/v1/traces", params={"deployment": "helper", "limit": 1}).json()
    rest = alice.get("/api/v1/traces", params={"deployment": "helper", "after_seq": page["next_seq"]}).json()
    assert len(page["traces"]) == 1 and len(rest["traces"]) == 3
    assert alice.get("/api/v1/traces", params={"limit": 5000}).status_code == 400

    # Owner scoping: bob sees none of it.
    assert bob.get("/api/v1/deployments/helper").status_code == 404
    assert bob.get(f"/api/v1/traces/{reply.id}").status_code == 404
    bob_client = OpenAI(base_url=server.base_url + "/v1", api_key=BOB)
    assert "helper" not in [m.id for m in bob_client.models.list().data]
    with pytest.raises(NotFoundError, match="your deployments: none"):
        bob_client.chat.completions.create(model="helper", messages=msgs, max_tokens=2)
    cards = {m.id: m.owned_by for m in client.models.list().data}
    assert cards["helper"] == "deployment"

    # Promotion to a missing checkpoint is refused before anything changes; a real one switches the version.
    before = alice.get("/api/v1/deployments/helper").json()
    missing = alice.post("/api/v1/deployments/helper/promote", json={"model_path": v1.replace("v1", "nope")})
    assert missing.status_code == 404 and "model_path" in missing.json()["detail"]
    assert alice.get("/api/v1/deployments/helper").json() == before
    promoted = alice.post("/api/v1/deployments/helper/promote", json={"model_path": v2, "reason": "trained"})
    assert promoted.json()["version"] == 2
    out = client.chat.completions.with_raw_response.create(model="helper", messages=msgs, max_tokens=2)
    assert out.headers["X-Treadle-Deployment-Version"] == "2"
    assert alice.get(f"/api/v1/traces/{out.parse().id}").json()["model_path"] == v2
    back = alice.post("/api/v1/deployments/helper/rollback", json={"reason": "worse"}).json()
    assert (back["version"], back["model_path"], back["history"][-1]["reason"]) == (
        3,
        v1,
        "rollback to v1: worse",
    )


@dataclasses.dataclass
class _Ran:
    returncode: int
    stdout: str
    stderr: str


def _cli(server: ServerProcess, capsys: pytest.CaptureFixture[str], *argv: str) -> _Ran:
    """`treadle ARGV` through the real CLI entry point, in-process (a subprocess per call costs seconds)."""
    capsys.readouterr()
    rc = main([*argv, "--base-url", server.base_url, "--api-key", ALICE])
    out = capsys.readouterr()
    return _Ran(rc, out.out, out.err)


def test_cli_deploy_and_export(
    server: ServerProcess, trained: tuple[Any, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, (v1, v2) = trained
    assert "cli-bot  v1" in _cli(server, capsys, "deploy", "create", "cli-bot", v1).stdout
    assert (
        "cli-bot  v2" in _cli(server, capsys, "deploy", "promote", "cli-bot", v2, "--reason", "better").stdout
    )
    assert "cli-bot  v3" in _cli(server, capsys, "deploy", "rollback", "cli-bot").stdout
    history = _cli(server, capsys, "deploy", "history", "cli-bot").stdout.splitlines()
    assert [h[2:].split()[0] for h in history] == ["v1", "v2", "v3"]
    assert history[-1].startswith("* v3") and "rollback to v1" in history[-1] and "better" in history[1]
    assert "cli-bot" in _cli(server, capsys, "deploy", "list").stdout
    missing = _cli(server, capsys, "deploy", "promote", "cli-bot", v1.replace("v1", "nope"))
    assert missing.returncode == 2 and "404" in missing.stderr and "model_path" in missing.stderr

    client = OpenAI(base_url=server.base_url + "/v1", api_key=ALICE)
    ids = [client.completions.create(model="cli-bot", prompt=p, max_tokens=2).id for p in ("a", "b")]
    out = tmp_path / "traces.jsonl"
    done = _cli(server, capsys, "traces", "export", "--deployment", "cli-bot", "--out", str(out))
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["completion_id"] for r in rows] == ids and all(r["version"] == 3 for r in rows)
    unknown = _cli(server, capsys, "traces", "export", "--deployment", "no-such")
    assert unknown.returncode == 2 and "your deployments" in unknown.stderr


def test_traces_survive_a_restart_and_retention_applies(
    server: ServerProcess, trained: tuple[Any, list[str]]
) -> None:
    _, (v1, _) = trained
    alice = _api(server, ALICE)
    alice.post("/api/v1/deployments", json={"name": "keeper", "model_path": v1})
    client = OpenAI(base_url=server.base_url + "/v1", api_key=ALICE)
    ids = [client.completions.create(model="keeper", prompt="Hi", max_tokens=2).id for _ in range(3)]
    alice.post("/api/v1/deployments/keeper/promote", json={"model_path": v1, "reason": "same weights"})
    server.stop()
    # Restart with retention: keep the newest trace of each deployment (the sweep runs every 0.5 s here).
    server.extra_args = (*server.extra_args, "--trace-keep", "1", "--session-timeout", "2")
    server.start()
    alice = _api(server, ALICE)
    assert alice.get("/api/v1/deployments/keeper").json()["version"] == 2
    client = OpenAI(base_url=server.base_url + "/v1", api_key=ALICE)
    out = client.completions.with_raw_response.create(model="keeper", prompt="Hi", max_tokens=2)
    assert out.headers["X-Treadle-Deployment-Version"] == "2"
    newest = out.parse().id
    for _ in range(100):
        left = [
            t["completion_id"]
            for t in alice.get("/api/v1/traces", params={"deployment": "keeper"}).json()["traces"]
        ]
        if left == [newest]:
            break
        time.sleep(0.1)
    assert left == [newest], (left, ids)
    deleted = alice.delete("/api/v1/deployments/keeper/traces").json()
    assert deleted == {"deleted": 1}
    assert alice.delete("/api/v1/deployments/nope/traces").status_code == 404
