"""Crash trials: `kill -9` a real server at a random moment while a client trains, samples, saves, publishes,
exports and deletes checkpoints, restart it on the same data, and check what survived:

- every request submitted before the kill resolves (a result, or an error of category `server`), none hangs;
- every listed checkpoint is complete (its PEFT files parse) and, if its save had completed, equals what was
  saved (same file digests); nothing half-written is visible; DB rows and checkpoint directories agree;
- a client continues: a new training client loads the newest completed checkpoint and trains.

`run_trial` is one trial; tests/e2e/reliability/test_crash.py runs a few in CI and scripts/crash_trials.py
runs many and prints the figures that RELIABILITY.md records.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import tinker
from safetensors.numpy import load_file
from tinker import types
from tinker.proto import tinker_public_pb2 as pb

from tests.e2e.conftest import ServerProcess

KEY = "tml-crash"
HIDDEN = (".",)  # temporaries of treadle.atomic start with a dot and are never listed


def datum(seed: int) -> types.Datum:
    toks = [(seed * 7 + i * 3) % 100 + 1 for i in range(6)]
    return types.Datum(
        model_input=types.ModelInput.from_ints(toks[:-1]),
        loss_fn_inputs={"target_tokens": types.TensorData.from_numpy(np.array(toks[1:], dtype=np.int64))},
    )


def digest_dir(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


@dataclasses.dataclass
class TrialResult:
    seconds_before_kill: float
    saves_completed: int
    requests_in_flight: int
    resolved_server_errors: int
    resolved_ok: int
    checkpoints_listed: int
    problems: list[str]


class Workload:
    """What the client does until the kill. It runs in a child process killed with the server (so no SDK retry
    outlives the kill) and appends one JSON line per event to `log`: a completed save with its file digests, a
    deleted checkpoint, a submitted request id."""

    def __init__(self, base_url: str, model: str, data_dir: Path, trial: int, resume: str | None, log: Path):
        self.base_url, self.model, self.data_dir = base_url, model, data_dir
        self.trial, self.resume = trial, resume
        self.out = open(log, "a")  # noqa: SIM115 - lives as long as the (killed) process

    def note(self, **event: Any) -> None:
        self.out.write(json.dumps(event) + "\n")
        self.out.flush()

    def completed(self, path: str) -> None:
        self.note(completed=path, digests=digest_dir(ckpt_dir(self.data_dir, path)))

    def train_and_save(self) -> None:
        """SDK client: forward_backward, optim_step, save_state, publish, sampler weights + sample, external
        export, delete of an older checkpoint: over and over."""
        svc = tinker.ServiceClient(base_url=self.base_url, api_key=KEY)
        if self.resume:
            tc = svc.create_training_client_from_state(self.resume).result()
        else:
            tc = svc.create_lora_training_client(base_model=self.model, rank=4).result()
        rest = svc.create_rest_client()
        for i in range(10_000):
            tc.forward_backward([datum(i)], "cross_entropy").result()
            tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
            saved = tc.save_state(f"t{self.trial}-s{i}").result().path
            self.completed(saved)
            if i % 3 == 1:
                rest.publish_checkpoint_from_tinker_path(saved).result()
            if i % 3 == 2:
                sp = tc.save_weights_for_sampler(f"t{self.trial}-p{i}").result().path
                self.completed(sp)
                sc = svc.create_sampling_client(model_path=sp)
                sc.sample(
                    types.ModelInput.from_ints([1, 2, 3]), 1, types.SamplingParams(max_tokens=4)
                ).result()
            if i % 4 == 3:
                self.completed(tc.save_weights_external(f"t{self.trial}-x{i}").result().path)
            if i >= 2:
                old = saved.rsplit("/", 1)[0] + f"/t{self.trial}-s{i - 2}"
                self.note(deleting=old)
                rest.delete_checkpoint_from_tinker_path(old).result()
                self.note(deleted=old)

    def flood(self) -> None:
        """Raw HTTP on a run of its own: queue training ops and saves, recording each request id."""
        head = {"X-API-Key": KEY}
        base = self.base_url + "/api/v1"
        with httpx.Client(timeout=30) as c:
            sid = c.post(f"{base}/create_session", json={}, headers=head).json()["session_id"]
            body = {
                "session_id": sid,
                "model_seq_id": 0,
                "base_model": self.model,
                "lora_config": {"rank": 4},
            }
            r = c.post(f"{base}/create_model", json=body, headers=head).json()
            mid = r["model_id"]
            self.note(request_id=r["request_id"])
            for seq in range(1, 10**6, 2):  # training seq_ids start at 1
                msg = pb.ForwardBackwardRequest(model_id=mid, seq_id=seq, loss_fn="cross_entropy")
                d = msg.data.add()
                d.model_input.add().encoded_text.tokens = np.arange(1, 9, dtype="<i4").tobytes()
                t = d.loss_fn_inputs["target_tokens"]
                t.dtype = pb.DTYPE_INT64  # type: ignore[assignment]
                t.shape.append(8)
                t.dense = np.arange(2, 10, dtype=np.int64).tobytes()
                r = c.post(
                    f"{base}/forward_backward",
                    content=msg.SerializeToString(),
                    headers={**head, "Content-Type": "application/x-protobuf"},
                )
                self.note(request_id=r.json()["request_id"])
                save = {"model_id": mid, "seq_id": seq + 1, "path": f"t{self.trial}-f{seq}"}
                self.note(
                    request_id=c.post(f"{base}/save_weights", json=save, headers=head).json()["request_id"]
                )
                time.sleep(0.05)


def ckpt_dir(data_dir: Path, path: str) -> Path:
    run, kind, name = path.removeprefix("tinker://").split("/")
    return data_dir / "checkpoints" / run / kind / name


@dataclasses.dataclass
class Recorded:
    """What the killed client had seen complete, and the requests it had sent."""

    completed: dict[str, dict[str, str]]
    request_ids: list[str]
    deleting: set[str]

    @classmethod
    def read(cls, log: Path) -> Recorded:
        completed: dict[str, dict[str, str]] = {}
        rids: list[str] = []
        deleting: set[str] = set()
        for line in log.read_text().splitlines():
            try:
                e = json.loads(line)
            except ValueError:  # the last line, cut by the kill
                continue
            if "completed" in e:
                completed[e["completed"]] = e["digests"]
            elif "request_id" in e:
                rids.append(e["request_id"])
            elif "deleting" in e:
                deleting.add(e["deleting"])  # in flight at the kill: either outcome is fine
            elif "deleted" in e:
                completed.pop(e["deleted"], None)
                deleting.discard(e["deleted"])
        return cls(completed, rids, deleting)


def _work_main(argv: list[str]) -> None:
    base_url, model, data_dir, trial, resume, log = argv
    w = Workload(base_url, model, Path(data_dir), int(trial), resume or None, Path(log))
    threading.Thread(target=w.flood, daemon=True).start()
    w.train_and_save()


def _retrieve(base: str, rid: str, deadline: float) -> dict[str, Any] | str:
    """The outcome after restart: 'ok' (a result), or the {error, category} body; 'pending' if it never came."""
    while time.monotonic() < deadline:
        r = httpx.post(
            f"{base}/api/v1/retrieve_future", json={"request_id": rid}, headers={"X-API-Key": KEY}, timeout=60
        )
        if r.status_code == 408:
            continue
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {r.text[:200]}", "category": "http"}
        if r.headers.get("content-type", "").startswith("application/json"):
            body = r.json()
            if "error" in body:
                return body
        return "ok"
    return "pending"


def check_after_restart(server: ServerProcess, work: Recorded) -> tuple[TrialResult, str | None]:
    problems: list[str] = []
    base = server.base_url
    ok = server_errors = 0
    # Generous: on a starved machine (nice'd, other work running) answering a few hundred polls takes a while;
    # a future the restarted server still calls pending keeps answering 408 until the deadline.
    deadline = time.monotonic() + 240
    for rid in work.request_ids:
        out = _retrieve(base, rid, deadline)
        if out == "ok":
            ok += 1
        elif isinstance(out, dict) and out.get("category") == "server":
            server_errors += 1
        else:
            problems.append(f"request {rid}: {out}")

    head = {"X-API-Key": KEY}
    listed = httpx.get(f"{base}/api/v1/checkpoints?limit=10000", headers=head, timeout=60).json()[
        "checkpoints"
    ]
    paths = {c["tinker_path"] for c in listed}
    for path in paths:
        d = ckpt_dir(server.data_dir, path)
        if not d.is_dir():
            problems.append(f"listed but missing on disk: {path}")
            continue
        files = {p.name for p in d.iterdir()}
        if "adapter_config.json" not in files or "adapter_model.safetensors" not in files:
            if not path.split("/")[-2] == "external_weights":
                problems.append(f"incomplete checkpoint visible: {path}: {sorted(files)}")
                continue
        try:
            if "adapter_config.json" in files:
                json.loads((d / "adapter_config.json").read_text())
            if "adapter_model.safetensors" in files:
                load_file(str(d / "adapter_model.safetensors"))
        except Exception as e:
            problems.append(f"checkpoint does not load: {path}: {e}")
        want = work.completed.get(path)
        if want is not None and digest_dir(d) != want:
            problems.append(f"checkpoint changed after its save completed: {path}")
    for path in work.completed:
        if path not in paths and path not in work.deleting:
            problems.append(f"a completed save is no longer listed: {path}")
    # DB and files agree: every checkpoint directory that is not a temporary has a row (is listed).
    root = server.data_dir / "checkpoints"
    for d in root.glob("*/*/*"):
        if d.is_dir() and not d.name.startswith(HIDDEN):
            path = f"tinker://{d.parent.parent.name}/{d.parent.name}/{d.name}"
            if path not in paths and d.parent.parent.name.startswith(tuple("0123456789abcdef")):
                problems.append(f"on disk but not in the DB: {path}")

    # The client continues from the newest completed training checkpoint.
    resume = None
    weights = [p for p in work.completed if "/weights/" in p]
    if weights:
        resume = weights[-1]
        try:
            svc = tinker.ServiceClient(base_url=base, api_key=KEY)
            tc = svc.create_training_client_from_state(resume).result()
            tc.forward_backward([datum(0)], "cross_entropy").result()
        except Exception as e:
            problems.append(f"client could not continue from {resume}: {type(e).__name__}: {e}"[:300])
    result = TrialResult(
        seconds_before_kill=0.0,
        saves_completed=len(work.completed),
        requests_in_flight=len(work.request_ids),
        resolved_server_errors=server_errors,
        resolved_ok=ok,
        checkpoints_listed=len(paths),
        problems=problems,
    )
    return result, resume


def run_trial(
    server: ServerProcess, trial: int, rng: random.Random, resume: str | None
) -> tuple[TrialResult, str | None]:
    """One trial on a started server: work, kill -9 at a random moment (server and client), restart, check.
    Leaves the server running; returns the result and the checkpoint the next trial resumes from."""
    log = server.data_dir.parent / f"trial-{trial}.jsonl"
    args = [server.base_url, server.model, str(server.data_dir), str(trial), resume or "", str(log)]
    env = {**os.environ, "TINKER_TELEMETRY": "0", "OMP_NUM_THREADS": "1"}
    client = subprocess.Popen(
        [sys.executable, "-m", "tests.e2e.reliability.crash", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(log.with_suffix(".err"), "ab"),  # noqa: SIM115 - closed with the process
        cwd=Path(__file__).resolve().parents[3],
    )
    # The random moment is counted from the client's first completed save (its start-up is slow and varies).
    started = time.monotonic()
    while time.monotonic() - started < 300 and client.poll() is None:
        if log.exists() and '"completed"' in log.read_text():
            break
        time.sleep(0.2)
    wait = rng.uniform(0.0, 4.0)
    time.sleep(wait)
    server.stop(kill=True)
    client.kill()
    client.wait()
    server.start(timeout_s=600)  # a loaded machine restarts slowly; what counts is that it comes back
    result, resume = check_after_restart(
        server, Recorded.read(log) if log.exists() else Recorded({}, [], set())
    )
    result.seconds_before_kill = wait
    return result, resume


def crash_server(model_dir: Path, data_dir: Path, db_url: str | None = None) -> ServerProcess:
    extra = ["--api-key", KEY, "--session-timeout", "600"]
    if db_url:
        extra += ["--db-url", db_url]
    return ServerProcess(model_dir, data_dir, *extra)


if __name__ == "__main__":
    _work_main(sys.argv[1:])
