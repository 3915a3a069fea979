"""The trace and feedback store on a real SQLite file and, when `TREADLE_TEST_POSTGRES_URL` names one, on a real
PostgreSQL: token ids and logprobs read back bit-identical, list filters and cursors, idempotent feedback,
retention by count and age, deleting a deployment's traces; and feedback validation naming the field."""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from treadle.errors import NotFoundError, UserError
from treadle.service.traces import ServedBy, TraceRecord, Traces, parse_feedback
from treadle.store import MetadataStore, utcnow
from treadle.store.traces import TraceFilter, TraceStore, VersionRow
from treadle.store.traces import metadata as trace_metadata

POSTGRES_URL = os.environ.get("TREADLE_TEST_POSTGRES_URL")


@pytest.fixture(params=["sqlite", "postgres"])
def traces(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Traces]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'meta.db'}"
    else:
        if not POSTGRES_URL:
            pytest.skip("set TREADLE_TEST_POSTGRES_URL to run the store tests on PostgreSQL")
        url = POSTGRES_URL
        engine = sa.create_engine(url)
        trace_metadata.drop_all(engine)  # each test starts from empty trace tables
        engine.dispose()
    meta = MetadataStore(url)
    yield Traces(TraceStore(meta))
    meta.close()


def _record(cid: str, session: str | None = None) -> TraceRecord:
    return TraceRecord(
        completion_id=cid,
        endpoint="chat",
        request={"model": "bot", "messages": [{"role": "user", "content": "hi"}]},
        prompt_tokens=[1, 2, 3],
        # Logprobs whose shortest repr is long: they must come back bit-identical.
        completion_tokens=[7, 8, 2],
        completion_logprobs=[-0.1 - 1e-17, -1.2345678901234567, math.log(0.3)],
        completion_text="ab",
        stop_reason="stop",
        timings={"queued_s": 0.001, "prefill_s": 0.01, "total_s": 0.1},
        user="u1",
        session_id=session,
    )


def _served(owner: str = "alice", dep: str = "bot", version: int = 1) -> ServedBy:
    return ServedBy(owner, dep, version, "tinker://r/sampler_weights/a", "base")


def test_traces_read_back_token_exact_with_monotonic_seq(traces: Traces) -> None:
    traces.record(_served(), [_record("c1"), _record("c1-1")])
    traces.record(_served(version=2), [_record("c2", session="s")])
    got = traces.get("alice", "c1")
    want = _record("c1")
    assert got["prompt_tokens"] == want.prompt_tokens
    assert got["completion_tokens"] == want.completion_tokens
    assert got["completion_logprobs"] == want.completion_logprobs  # exact float equality
    assert (got["deployment"], got["version"], got["user"], got["feedback"]) == ("bot", 1, "u1", [])
    page = traces.query(TraceFilter("alice", deployment="bot"))
    seqs = [t["seq"] for t in page["traces"]]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3 and page["next_seq"] == seqs[-1]
    assert [t["completion_id"] for t in traces.query(TraceFilter("alice", version=2))["traces"]] == ["c2"]
    assert traces.query(TraceFilter("alice", session_id="s"))["traces"][0]["completion_id"] == "c2"
    after = traces.query(TraceFilter("alice", after_seq=seqs[1]))
    assert [t["seq"] for t in after["traces"]] == seqs[2:]
    empty = traces.query(TraceFilter("alice", after_seq=seqs[-1]))
    assert empty == {"traces": [], "next_seq": seqs[-1]}
    assert traces.query(TraceFilter("alice", limit=1))["traces"][0]["seq"] == seqs[0]


def test_traces_are_owner_scoped(traces: Traces) -> None:
    traces.record(_served("alice"), [_record("c1")])
    with pytest.raises(NotFoundError, match="completion_id"):
        traces.get("bob", "c1")
    assert traces.query(TraceFilter("bob"))["traces"] == []
    with pytest.raises(NotFoundError, match="completion_id"):
        traces.add_feedback("bob", {"completion_id": "c1", "rating": 1})


def test_feedback_is_stored_with_its_trace_and_idempotent(traces: Traces) -> None:
    traces.record(_served(), [_record("c1"), _record("c2")])
    first, created = traces.add_feedback(
        "alice", {"completion_id": "c1", "reward": 0.5, "idempotency_key": "k"}
    )
    assert created and first["reward"] == 0.5
    again, created = traces.add_feedback(
        "alice", {"completion_id": "c1", "reward": 0.9, "idempotency_key": "k"}
    )
    assert not created and again == first
    traces.add_feedback("alice", {"completion_id": "c1", "rating": -1, "correction": "better"})
    fb = traces.get("alice", "c1")["feedback"]
    assert [(f["reward"], f["rating"], f["correction"]) for f in fb] == [
        (0.5, None, None),
        (None, -1, "better"),
    ]
    with_fb = traces.query(TraceFilter("alice", has_feedback=True))["traces"]
    without = traces.query(TraceFilter("alice", has_feedback=False))["traces"]
    assert [t["completion_id"] for t in with_fb] == ["c1"]
    assert [t["completion_id"] for t in without] == ["c2"]
    # Another owner may use the same key for their own feedback.
    traces.record(_served("bob"), [_record("b1")])
    assert traces.add_feedback("bob", {"completion_id": "b1", "rating": 1, "idempotency_key": "k"})[1]


def test_retention_by_count_and_age_and_deleting_a_deployment(traces: Traces) -> None:
    for i in range(5):
        traces.record(_served(dep="bot"), [_record(f"a{i}")])
    traces.record(_served(dep="other"), [_record("o0")])
    traces.add_feedback("alice", {"completion_id": "a0", "rating": 1})
    keep2 = Traces(traces.store, dataclasses.replace(traces.retention, keep=2))
    assert keep2.prune() == 3
    left = [t["completion_id"] for t in traces.query(TraceFilter("alice"))["traces"]]
    assert left == ["a3", "a4", "o0"]
    aged = Traces(traces.store, dataclasses.replace(traces.retention, max_age_s=60.0))
    assert aged.prune(now=utcnow() + dt.timedelta(seconds=30)) == 0
    assert aged.prune(now=utcnow() + dt.timedelta(seconds=120)) == 3
    traces.record(_served(dep="bot"), [_record("n1")])
    traces.record(_served(dep="other"), [_record("n2")])
    assert traces.delete("alice", "bot") == 1
    assert [t["completion_id"] for t in traces.query(TraceFilter("alice"))["traces"]] == ["n2"]
    # A deleted trace's seq is never handed out again: cursors stay valid.
    last = traces.query(TraceFilter("alice"))["next_seq"]
    traces.record(_served(dep="bot"), [_record("n3")])
    assert traces.get("alice", "n3")["seq"] > last


def test_deployment_history_round_trip(traces: Traces) -> None:
    store = traces.store
    now = utcnow()
    assert store.add_deployment("alice", "bot", "base", VersionRow(1, "base", now, "create"))
    assert not store.add_deployment("alice", "bot", "base", VersionRow(1, "base", now, "create"))
    store.add_version("alice", "bot", VersionRow(2, "tinker://r/sampler_weights/a", now, "promote"))
    row = store.get_deployment("alice", "bot")
    assert row is not None and row.version == 2 and row.live.model_path.endswith("/a")
    assert [v.version for v in row.history] == [1, 2]
    assert store.get_deployment("bob", "bot") is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"reward": 1.0}, "completion_id"),
        ({"completion_id": "c"}, "body"),
        ({"completion_id": "c", "reward": float("inf")}, "reward"),
        ({"completion_id": "c", "reward": 2e6}, "reward"),
        ({"completion_id": "c", "reward": True}, "reward"),
        ({"completion_id": "c", "rating": 0}, "rating"),
        ({"completion_id": "c", "rating": "up"}, "rating"),
        ({"completion_id": "c", "correction": "x" * 100_001}, "correction"),
        ({"completion_id": "c", "comment": "x" * 10_001}, "comment"),
        ({"completion_id": "c", "rating": 1, "idempotency_key": ""}, "idempotency_key"),
        ({"completion_id": "c", "rating": 1, "score": 3}, "score"),
    ],
)
def test_bad_feedback_names_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(UserError) as e:
        parse_feedback("alice", body)
    assert e.value.field == field and e.value.message.startswith(f"{field}:")


def test_good_feedback_parses() -> None:
    row = parse_feedback("alice", {"completion_id": "c", "reward": -1e6, "rating": 1, "comment": "ok"})
    assert (row.reward, row.rating, row.comment, row.correction) == (-1e6, 1, "ok", None)
