"""The metadata DB: sessions, training runs, sampling sessions, checkpoints and durable futures.

SQLAlchemy Core over SQLite by default (a file under the data dir); any SQLAlchemy URL (Postgres) works.
Rows are returned as plain dataclasses so no SQLAlchemy object leaks into the service layer.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import threading
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.exc import IntegrityError

metadata = sa.MetaData()

sessions_t = sa.Table(
    "sessions",
    metadata,
    sa.Column("session_id", sa.String(200), primary_key=True),
    sa.Column("owner", sa.String(200), nullable=False, index=True),
    sa.Column("status", sa.String(32), nullable=False),  # active | finished | expired
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_heartbeat", sa.DateTime(timezone=True), nullable=False),
    sa.Column("user_metadata", sa.Text, nullable=False, default="{}"),
    sa.Column("tags", sa.Text, nullable=False, default="[]"),
)

runs_t = sa.Table(
    "training_runs",
    metadata,
    sa.Column("run_id", sa.String(300), primary_key=True),
    sa.Column("session_id", sa.String(200), nullable=False, index=True),
    sa.Column("owner", sa.String(200), nullable=False, index=True),
    sa.Column("base_model", sa.String(500), nullable=False),
    sa.Column("lora_config", sa.Text, nullable=False),
    sa.Column("user_metadata", sa.Text, nullable=False, default="{}"),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("last_request_time", sa.DateTime(timezone=True), nullable=False),
)

samplers_t = sa.Table(
    "sampling_sessions",
    metadata,
    sa.Column("sampler_id", sa.String(300), primary_key=True),
    sa.Column("session_id", sa.String(200), nullable=False, index=True),
    sa.Column("owner", sa.String(200), nullable=False),
    sa.Column("base_model", sa.String(500), nullable=False),
    sa.Column("model_path", sa.String(1000), nullable=True),
    sa.Column("source", sa.String(16), nullable=False),  # base | checkpoint | snapshot
)

checkpoints_t = sa.Table(
    "checkpoints",
    metadata,
    sa.Column("run_id", sa.String(300), primary_key=True),
    sa.Column("kind", sa.String(32), primary_key=True),  # weights | sampler_weights | external_weights
    sa.Column("name", sa.String(300), primary_key=True),
    sa.Column("owner", sa.String(200), nullable=False, index=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False, default=0),
    sa.Column("public", sa.Boolean, nullable=False, default=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("user_metadata", sa.Text, nullable=False, default="{}"),
)

futures_t = sa.Table(
    "futures",
    metadata,
    sa.Column("request_id", sa.String(64), primary_key=True),
    sa.Column("owner", sa.String(200), nullable=False),
    sa.Column("kind", sa.String(64), nullable=False),
    sa.Column("dedupe_key", sa.String(600), nullable=True, unique=True),
    sa.Column("state", sa.String(16), nullable=False),  # pending | done | error
    # A done future's payload, in the service's own versioned format (treadle/service/results.py): JSON text for
    # scalar results, a binary blob for tensor results. ("result_proto" is the historical column name.)
    sa.Column("result_json", sa.Text, nullable=True),
    sa.Column("result_proto", sa.LargeBinary, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("category", sa.String(16), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

# The futures statements run on every op's path: built once, executed with parameters.
_INSERT_FUTURE = futures_t.insert()
_FUTURE_BY_DEDUPE = sa.select(futures_t.c.request_id).where(futures_t.c.dedupe_key == sa.bindparam("key"))
_FINISH_FUTURE = (
    futures_t.update()
    .where(futures_t.c.request_id == sa.bindparam("rid"))
    .values(
        state=sa.bindparam("state"),
        result_json=sa.bindparam("result_json"),
        result_proto=sa.bindparam("result_proto"),
        error=sa.bindparam("error"),
        category=sa.bindparam("category"),
    )
)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def as_utc(t: dt.datetime) -> dt.datetime:
    """SQLite drops tzinfo on the way back; every stored time is UTC."""
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


@dataclasses.dataclass
class SessionRow:
    session_id: str
    owner: str
    status: str
    created_at: dt.datetime
    last_heartbeat: dt.datetime
    user_metadata: dict[str, Any]
    tags: list[str]


@dataclasses.dataclass
class RunRow:
    run_id: str
    session_id: str
    owner: str
    base_model: str
    lora_config: dict[str, Any]
    user_metadata: dict[str, Any]
    created_at: dt.datetime
    last_request_time: dt.datetime


@dataclasses.dataclass
class SamplerRow:
    sampler_id: str
    session_id: str
    owner: str
    base_model: str
    model_path: str | None
    source: str  # base | checkpoint | snapshot (in-memory weights, gone after a restart)


@dataclasses.dataclass
class CheckpointRow:
    run_id: str
    kind: str
    name: str
    owner: str
    created_at: dt.datetime
    size_bytes: int
    public: bool
    expires_at: dt.datetime | None
    user_metadata: dict[str, Any]


@dataclasses.dataclass
class FutureRow:
    request_id: str
    owner: str
    kind: str
    dedupe_key: str | None
    state: str
    result_json: str | None
    result_proto: bytes | None
    error: str | None
    category: str | None


class MetadataStore:
    """Thread-safe access to the metadata DB; every method is one short transaction."""

    def __init__(self, url: str) -> None:
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            # The worker threads resolve futures, so the connection crosses threads.
            kwargs["connect_args"] = {"check_same_thread": False}
        self._engine = sa.create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            sa_event.listen(self._engine, "connect", _sqlite_pragmas)
        # SQLite allows one writer; serialising writes here avoids "database is locked" under load.
        self._write_lock = threading.Lock()
        metadata.create_all(self._engine)

    def close(self) -> None:
        self._engine.dispose()

    @property
    def engine(self) -> sa.Engine:
        """For stores of other concerns (e.g. `treadle.store.traces`) that share this DB and its writer lock."""
        return self._engine

    @property
    def write_lock(self) -> threading.Lock:
        return self._write_lock

    def _write(self, stmt: Any) -> int:
        with self._write_lock, self._engine.begin() as conn:
            return conn.execute(stmt).rowcount

    def _rows(self, stmt: Any) -> list[Any]:
        with self._engine.connect() as conn:
            return list(conn.execute(stmt).mappings())

    # ---- sessions
    def add_session(self, row: SessionRow) -> None:
        d = dataclasses.asdict(row)
        d["user_metadata"] = json.dumps(row.user_metadata)
        d["tags"] = json.dumps(row.tags)
        self._write(sessions_t.insert().values(**d))

    def get_session(self, session_id: str) -> SessionRow | None:
        rows = self._rows(sessions_t.select().where(sessions_t.c.session_id == session_id))
        return _session(rows[0]) if rows else None

    def list_sessions(self, owner: str, status: str | None, limit: int, offset: int) -> list[SessionRow]:
        q = sessions_t.select().where(sessions_t.c.owner == owner)
        if status is not None:
            q = q.where(sessions_t.c.status == status)
        q = q.order_by(sessions_t.c.created_at.desc()).limit(limit).offset(offset)
        return [_session(r) for r in self._rows(q)]

    def set_session_status(self, session_id: str, status: str) -> None:
        self._write(sessions_t.update().where(sessions_t.c.session_id == session_id).values(status=status))

    def touch_session(self, session_id: str, at: dt.datetime) -> None:
        self._write(
            sessions_t.update().where(sessions_t.c.session_id == session_id).values(last_heartbeat=at)
        )

    def stale_sessions(self, before: dt.datetime) -> list[str]:
        q = sa.select(sessions_t.c.session_id).where(
            sessions_t.c.status == "active", sessions_t.c.last_heartbeat < before
        )
        return [r["session_id"] for r in self._rows(q)]

    # ---- training runs
    def add_run(self, row: RunRow) -> None:
        d = dataclasses.asdict(row)
        d["lora_config"] = json.dumps(row.lora_config)
        d["user_metadata"] = json.dumps(row.user_metadata)
        self._write(runs_t.insert().values(**d))

    def get_run(self, run_id: str) -> RunRow | None:
        rows = self._rows(runs_t.select().where(runs_t.c.run_id == run_id))
        return _run(rows[0]) if rows else None

    def list_runs(self, owner: str | None, limit: int, offset: int) -> tuple[list[RunRow], int]:
        q = runs_t.select()
        count = sa.select(sa.func.count()).select_from(runs_t)
        if owner is not None:
            q = q.where(runs_t.c.owner == owner)
            count = count.where(runs_t.c.owner == owner)
        q = q.order_by(runs_t.c.created_at.desc()).limit(limit).offset(offset)
        with self._engine.connect() as conn:
            total = int(conn.execute(count).scalar_one())
        return [_run(r) for r in self._rows(q)], total

    def runs_of_session(self, session_id: str) -> list[str]:
        q = sa.select(runs_t.c.run_id).where(runs_t.c.session_id == session_id).order_by(runs_t.c.created_at)
        return [r["run_id"] for r in self._rows(q)]

    def touch_run(self, run_id: str) -> None:
        self._write(runs_t.update().where(runs_t.c.run_id == run_id).values(last_request_time=utcnow()))

    # ---- sampling sessions
    def add_sampler(self, row: SamplerRow) -> None:
        self._write(samplers_t.insert().values(**dataclasses.asdict(row)))

    def get_sampler(self, sampler_id: str) -> SamplerRow | None:
        rows = self._rows(samplers_t.select().where(samplers_t.c.sampler_id == sampler_id))
        return SamplerRow(**rows[0]) if rows else None

    def samplers_of_session(self, session_id: str) -> list[str]:
        q = sa.select(samplers_t.c.sampler_id).where(samplers_t.c.session_id == session_id)
        return [r["sampler_id"] for r in self._rows(q)]

    # ---- checkpoints
    def upsert_checkpoint(self, row: CheckpointRow) -> None:
        d = dataclasses.asdict(row)
        d["user_metadata"] = json.dumps(row.user_metadata)
        key = (
            (checkpoints_t.c.run_id == row.run_id)
            & (checkpoints_t.c.kind == row.kind)
            & (checkpoints_t.c.name == row.name)
        )
        with self._write_lock, self._engine.begin() as conn:
            conn.execute(checkpoints_t.delete().where(key))
            conn.execute(checkpoints_t.insert().values(**d))

    def get_checkpoint(self, run_id: str, kind: str, name: str) -> CheckpointRow | None:
        q = checkpoints_t.select().where(
            checkpoints_t.c.run_id == run_id, checkpoints_t.c.kind == kind, checkpoints_t.c.name == name
        )
        rows = self._rows(q)
        return _checkpoint(rows[0]) if rows else None

    def list_checkpoints(
        self, *, run_id: str | None = None, owner: str | None = None, limit: int = 1000, offset: int = 0
    ) -> tuple[list[CheckpointRow], int]:
        conds: list[Any] = []
        if run_id is not None:
            conds.append(checkpoints_t.c.run_id == run_id)
        if owner is not None:
            conds.append(checkpoints_t.c.owner == owner)
        q = checkpoints_t.select().where(*conds).order_by(checkpoints_t.c.created_at.desc())
        count = sa.select(sa.func.count()).select_from(checkpoints_t).where(*conds)
        with self._engine.connect() as conn:
            total = int(conn.execute(count).scalar_one())
        return [_checkpoint(r) for r in self._rows(q.limit(limit).offset(offset))], total

    def update_checkpoint(self, run_id: str, kind: str, name: str, **values: Any) -> None:
        self._write(
            checkpoints_t.update()
            .where(
                checkpoints_t.c.run_id == run_id, checkpoints_t.c.kind == kind, checkpoints_t.c.name == name
            )
            .values(**values)
        )

    def delete_checkpoint(self, run_id: str, kind: str, name: str) -> bool:
        return (
            self._write(
                checkpoints_t.delete().where(
                    checkpoints_t.c.run_id == run_id,
                    checkpoints_t.c.kind == kind,
                    checkpoints_t.c.name == name,
                )
            )
            > 0
        )

    def expired_checkpoints(self, now: dt.datetime) -> list[CheckpointRow]:
        q = checkpoints_t.select().where(
            checkpoints_t.c.expires_at.is_not(None), checkpoints_t.c.expires_at < now
        )
        return [_checkpoint(r) for r in self._rows(q)]

    # ---- futures
    def add_future(self, request_id: str, owner: str, kind: str, dedupe_key: str | None) -> str:
        """Insert a pending future; if `dedupe_key` was seen before, return the existing request id instead.

        On every op's path: one prepared INSERT in the common case, the lookup only when the key's unique
        constraint refuses it (a retried submission)."""
        row = {
            "request_id": request_id,
            "owner": owner,
            "kind": kind,
            "dedupe_key": dedupe_key,
            "state": "pending",
            "created_at": utcnow(),
        }
        try:
            with self._write_lock, self._engine.begin() as conn:
                conn.execute(_INSERT_FUTURE, row)
            return request_id
        except IntegrityError:
            if dedupe_key is None:
                raise
        with self._engine.connect() as conn:
            hit = conn.execute(_FUTURE_BY_DEDUPE, {"key": dedupe_key}).first()
        assert hit is not None, "futures are never deleted, so the row that refused ours exists"
        return str(hit[0])

    def finish_future(
        self,
        request_id: str,
        *,
        result_json: str | None = None,
        result_proto: bytes | None = None,
        error: str | None = None,
        category: str | None = None,
    ) -> None:
        with self._write_lock, self._engine.begin() as conn:
            conn.execute(
                _FINISH_FUTURE,
                {
                    "rid": request_id,
                    "state": "error" if error is not None else "done",
                    "result_json": result_json,
                    "result_proto": result_proto,
                    "error": error,
                    "category": category,
                },
            )

    def get_future(self, request_id: str) -> FutureRow | None:
        q = futures_t.select().where(futures_t.c.request_id == request_id)
        rows = self._rows(q)
        if not rows:
            return None
        r = rows[0]
        return FutureRow(**{f.name: r[f.name] for f in dataclasses.fields(FutureRow)})

    def fail_pending_futures(self, message: str) -> int:
        """At start-up: whatever was in flight when the previous process died can never finish."""
        return self._write(
            futures_t.update()
            .where(futures_t.c.state == "pending")
            .values(state="error", error=message, category="server")
        )


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _session(r: Any) -> SessionRow:
    return SessionRow(
        session_id=r["session_id"],
        owner=r["owner"],
        status=r["status"],
        created_at=as_utc(r["created_at"]),
        last_heartbeat=as_utc(r["last_heartbeat"]),
        user_metadata=json.loads(r["user_metadata"]),
        tags=json.loads(r["tags"]),
    )


def _run(r: Any) -> RunRow:
    return RunRow(
        run_id=r["run_id"],
        session_id=r["session_id"],
        owner=r["owner"],
        base_model=r["base_model"],
        lora_config=json.loads(r["lora_config"]),
        user_metadata=json.loads(r["user_metadata"]),
        created_at=as_utc(r["created_at"]),
        last_request_time=as_utc(r["last_request_time"]),
    )


def _checkpoint(r: Any) -> CheckpointRow:
    return CheckpointRow(
        run_id=r["run_id"],
        kind=r["kind"],
        name=r["name"],
        owner=r["owner"],
        created_at=as_utc(r["created_at"]),
        size_bytes=int(r["size_bytes"]),
        public=bool(r["public"]),
        expires_at=as_utc(r["expires_at"]) if r["expires_at"] is not None else None,
        user_metadata=json.loads(r["user_metadata"]),
    )
