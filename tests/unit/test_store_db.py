"""The metadata DB on a real SQLite file and, when `TREADLE_TEST_POSTGRES_URL` names one (CI starts a local
PostgreSQL), on a real Postgres server: future dedupe, restart recovery, checkpoint listing/TTL, sessions."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from treadle.store import CheckpointRow, MetadataStore, RunRow, SessionRow, utcnow
from treadle.store.db import metadata

POSTGRES_URL = os.environ.get("TREADLE_TEST_POSTGRES_URL")


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'meta.db'}"
        return
    if not POSTGRES_URL:
        pytest.skip("set TREADLE_TEST_POSTGRES_URL to run the store tests on PostgreSQL")
    engine = sa.create_engine(POSTGRES_URL)
    metadata.drop_all(engine)  # each test starts from an empty schema
    engine.dispose()
    yield POSTGRES_URL


@pytest.fixture
def store(db_url: str) -> Iterator[MetadataStore]:
    s = MetadataStore(db_url)
    yield s
    s.close()


def test_retried_submission_maps_to_the_same_future(store: MetadataStore) -> None:
    assert store.add_future("r1", "alice", "optim_step", "op:m:1") == "r1"
    assert store.add_future("r2", "alice", "optim_step", "op:m:1") == "r1"
    assert store.add_future("r3", "alice", "optim_step", "op:m:2") == "r3"
    assert store.get_future("r2") is None


def test_restart_fails_pending_futures_and_keeps_results(db_url: str) -> None:
    url = db_url
    first = MetadataStore(url)
    first.add_future("done", "a", "optim_step", None)
    first.finish_future("done", result_json='{"metrics": {}}')
    first.add_future("inflight", "a", "forward_backward", None)
    first.close()
    second = MetadataStore(url)  # a new process on the same data dir
    assert second.fail_pending_futures("restarted") == 1
    row = second.get_future("inflight")
    assert row is not None and row.state == "error" and row.category == "server"
    done = second.get_future("done")
    assert done is not None and done.state == "done" and done.result_json == '{"metrics": {}}'
    second.close()


def test_checkpoints_listed_newest_first_and_expiry(store: MetadataStore) -> None:
    now = utcnow()
    for i, exp in enumerate([None, now - dt.timedelta(seconds=1)]):
        store.upsert_checkpoint(
            CheckpointRow(
                "run", "weights", f"c{i}", "alice", now + dt.timedelta(seconds=i), 10, False, exp, {}
            )
        )
    rows, total = store.list_checkpoints(run_id="run")
    assert total == 2 and [r.name for r in rows] == ["c1", "c0"]
    assert [r.name for r in store.expired_checkpoints(now)] == ["c1"]
    assert store.list_checkpoints(owner="bob")[1] == 0
    # upsert replaces (overwrite=True saves), it never duplicates
    store.upsert_checkpoint(CheckpointRow("run", "weights", "c0", "alice", now, 99, False, None, {"k": "v"}))
    c0 = store.get_checkpoint("run", "weights", "c0")
    assert c0 is not None and c0.size_bytes == 99 and c0.user_metadata == {"k": "v"}
    assert store.delete_checkpoint("run", "weights", "c0") and not store.delete_checkpoint(
        "run", "weights", "c0"
    )


def test_sessions_and_runs(store: MetadataStore) -> None:
    old = utcnow() - dt.timedelta(hours=1)
    store.add_session(SessionRow("s1", "alice", "active", old, old, {"a": 1}, ["t"]))
    store.add_session(SessionRow("s2", "alice", "active", old, utcnow(), {}, []))
    assert store.stale_sessions(utcnow() - dt.timedelta(minutes=5)) == ["s1"]
    store.set_session_status("s1", "expired")
    assert [s.session_id for s in store.list_sessions("alice", "expired", 10, 0)] == ["s1"]
    assert store.list_sessions("bob", None, 10, 0) == []
    s1 = store.get_session("s1")
    assert s1 is not None and s1.user_metadata == {"a": 1} and s1.last_heartbeat.tzinfo is not None
    store.add_run(RunRow("s1:train:0", "s1", "alice", "m", {"rank": 4}, {"renderer_name": "r"}, old, old))
    runs, total = store.list_runs("alice", 10, 0)
    assert (
        total == 1 and runs[0].lora_config == {"rank": 4} and runs[0].user_metadata == {"renderer_name": "r"}
    )
    assert store.runs_of_session("s1") == ["s1:train:0"]
