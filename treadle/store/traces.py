"""The deployment tables: deployments with their version history, token-exact completion traces, and feedback.

They live in the same metadata DB as the Tinker tables (SQLite or any SQLAlchemy URL) and share its writer lock;
rows come back as plain dataclasses. Token ids and logprobs are stored as JSON text: `json` writes a float's
shortest round-tripping repr, so a logprob reads back bit-identical.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from treadle.store.db import MetadataStore, as_utc

metadata = sa.MetaData()

deployments_t = sa.Table(
    "deployments",
    metadata,
    sa.Column("owner", sa.String(200), primary_key=True),
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("base_model", sa.String(500), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),  # the live one
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

versions_t = sa.Table(
    "deployment_versions",
    metadata,
    sa.Column("owner", sa.String(200), primary_key=True),
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("model_path", sa.String(1000), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("reason", sa.Text, nullable=False, default=""),
)

traces_t = sa.Table(
    "traces",
    metadata,
    # AUTOINCREMENT on SQLite: a seq is never reused after deletions, so `after_seq` cursors stay valid.
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("completion_id", sa.String(100), nullable=False, unique=True),
    sa.Column("owner", sa.String(200), nullable=False),
    sa.Column("deployment", sa.String(64), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("model_path", sa.String(1000), nullable=False),
    sa.Column("base_model", sa.String(500), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("endpoint", sa.String(16), nullable=False),
    sa.Column("request", sa.Text, nullable=False),
    sa.Column("prompt_tokens", sa.Text, nullable=False),
    sa.Column("completion_tokens", sa.Text, nullable=False),
    sa.Column("completion_logprobs", sa.Text, nullable=False),
    sa.Column("completion_text", sa.Text, nullable=False),
    sa.Column("stop_reason", sa.String(32), nullable=False),
    sa.Column("timings", sa.Text, nullable=False),
    sa.Column("user", sa.String(500), nullable=True),
    sa.Column("session_id", sa.String(500), nullable=True),
    sa.Index("ix_traces_owner_deployment_seq", "owner", "deployment", "seq"),
    sqlite_autoincrement=True,
)

feedback_t = sa.Table(
    "feedback",
    metadata,
    sa.Column("feedback_id", sa.String(64), primary_key=True),
    sa.Column("completion_id", sa.String(100), nullable=False, index=True),
    sa.Column("owner", sa.String(200), nullable=False),
    sa.Column("reward", sa.Float, nullable=True),
    sa.Column("rating", sa.Integer, nullable=True),
    sa.Column("correction", sa.Text, nullable=True),
    sa.Column("comment", sa.Text, nullable=True),
    sa.Column("idempotency_key", sa.String(200), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("owner", "idempotency_key", name="uq_feedback_idempotency"),
)


@dataclasses.dataclass
class VersionRow:
    version: int
    model_path: str
    created_at: dt.datetime
    reason: str


@dataclasses.dataclass
class DeploymentRow:
    owner: str
    name: str
    base_model: str
    version: int
    created_at: dt.datetime
    updated_at: dt.datetime
    history: list[VersionRow]

    @property
    def live(self) -> VersionRow:
        return next(v for v in self.history if v.version == self.version)


@dataclasses.dataclass
class FeedbackRow:
    feedback_id: str
    completion_id: str
    owner: str
    reward: float | None
    rating: int | None
    correction: str | None
    comment: str | None
    idempotency_key: str | None
    created_at: dt.datetime


@dataclasses.dataclass
class TraceRow:
    completion_id: str
    owner: str
    deployment: str
    version: int
    model_path: str
    base_model: str
    created_at: dt.datetime
    endpoint: str
    request: dict[str, Any]
    prompt_tokens: list[int]
    completion_tokens: list[int]
    completion_logprobs: list[float]
    completion_text: str
    stop_reason: str
    timings: dict[str, float | None]
    user: str | None
    session_id: str | None
    seq: int = 0  # assigned by the store
    feedback: list[FeedbackRow] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class TraceFilter:
    owner: str
    deployment: str | None = None
    version: int | None = None
    after_seq: int = 0
    has_feedback: bool | None = None
    session_id: str | None = None
    limit: int = 100


_TRACE_JSON = ("request", "prompt_tokens", "completion_tokens", "completion_logprobs", "timings")


class TraceStore:
    """Deployments, traces and feedback over the `MetadataStore`'s DB; every method is one short transaction."""

    def __init__(self, store: MetadataStore) -> None:
        self._engine = store.engine
        self._write_lock = store.write_lock
        metadata.create_all(self._engine)

    def _rows(self, stmt: Any) -> list[Any]:
        with self._engine.connect() as conn:
            return list(conn.execute(stmt).mappings())

    # ---- deployments
    def add_deployment(self, owner: str, name: str, base_model: str, first: VersionRow) -> bool:
        """Insert a deployment with its version 1; False if `owner` already has one called `name`."""
        try:
            with self._write_lock, self._engine.begin() as conn:
                conn.execute(
                    deployments_t.insert().values(
                        owner=owner,
                        name=name,
                        base_model=base_model,
                        version=first.version,
                        created_at=first.created_at,
                        updated_at=first.created_at,
                    )
                )
                conn.execute(versions_t.insert().values(owner=owner, name=name, **dataclasses.asdict(first)))
        except IntegrityError:
            return False
        return True

    def add_version(self, owner: str, name: str, row: VersionRow) -> None:
        """Append `row` to the history and make it live, in one transaction."""
        with self._write_lock, self._engine.begin() as conn:
            conn.execute(versions_t.insert().values(owner=owner, name=name, **dataclasses.asdict(row)))
            conn.execute(
                deployments_t.update()
                .where(deployments_t.c.owner == owner, deployments_t.c.name == name)
                .values(version=row.version, updated_at=row.created_at)
            )

    def get_deployment(self, owner: str, name: str) -> DeploymentRow | None:
        rows = self._rows(
            deployments_t.select().where(deployments_t.c.owner == owner, deployments_t.c.name == name)
        )
        if not rows:
            return None
        return self._deployment(rows[0], self._history(owner, [name]).get(name, []))

    def list_deployments(self, owner: str) -> list[DeploymentRow]:
        rows = self._rows(
            deployments_t.select().where(deployments_t.c.owner == owner).order_by(deployments_t.c.name)
        )
        history = self._history(owner, [r["name"] for r in rows])
        return [self._deployment(r, history.get(r["name"], [])) for r in rows]

    def _history(self, owner: str, names: list[str]) -> dict[str, list[VersionRow]]:
        if not names:
            return {}
        q = (
            versions_t.select()
            .where(versions_t.c.owner == owner, versions_t.c.name.in_(names))
            .order_by(versions_t.c.name, versions_t.c.version)
        )
        out: dict[str, list[VersionRow]] = {}
        for r in self._rows(q):
            out.setdefault(r["name"], []).append(
                VersionRow(r["version"], r["model_path"], as_utc(r["created_at"]), r["reason"])
            )
        return out

    @staticmethod
    def _deployment(r: Any, history: list[VersionRow]) -> DeploymentRow:
        return DeploymentRow(
            owner=r["owner"],
            name=r["name"],
            base_model=r["base_model"],
            version=int(r["version"]),
            created_at=as_utc(r["created_at"]),
            updated_at=as_utc(r["updated_at"]),
            history=history,
        )

    # ---- traces
    def add_traces(self, rows: list[TraceRow]) -> None:
        """Insert traces (one request's choices) in one transaction; each row's `seq` is set from the DB."""
        if not rows:
            return
        with self._write_lock, self._engine.begin() as conn:
            for row in rows:
                d = dataclasses.asdict(row)
                d.pop("seq")
                d.pop("feedback")
                for k in _TRACE_JSON:
                    d[k] = json.dumps(d[k])
                key = conn.execute(traces_t.insert().values(**d)).inserted_primary_key
                assert key is not None, "an INSERT always reports its primary key"
                row.seq = int(key[0])

    def get_trace(self, owner: str, completion_id: str) -> TraceRow | None:
        rows = self._rows(
            traces_t.select().where(traces_t.c.owner == owner, traces_t.c.completion_id == completion_id)
        )
        return self._with_feedback([_trace(r) for r in rows])[0] if rows else None

    def list_traces(self, f: TraceFilter) -> list[TraceRow]:
        conds: list[Any] = [traces_t.c.owner == f.owner, traces_t.c.seq > f.after_seq]
        if f.deployment is not None:
            conds.append(traces_t.c.deployment == f.deployment)
        if f.version is not None:
            conds.append(traces_t.c.version == f.version)
        if f.session_id is not None:
            conds.append(traces_t.c.session_id == f.session_id)
        if f.has_feedback is not None:
            has = sa.exists().where(feedback_t.c.completion_id == traces_t.c.completion_id)
            conds.append(has if f.has_feedback else ~has)
        q = traces_t.select().where(*conds).order_by(traces_t.c.seq).limit(f.limit)
        return self._with_feedback([_trace(r) for r in self._rows(q)])

    def _with_feedback(self, traces: list[TraceRow]) -> list[TraceRow]:
        if not traces:
            return traces
        by_id = {t.completion_id: t for t in traces}
        q = (
            feedback_t.select()
            .where(feedback_t.c.completion_id.in_(list(by_id)))
            .order_by(feedback_t.c.created_at)
        )
        for r in self._rows(q):
            by_id[r["completion_id"]].feedback.append(_feedback(r))
        return traces

    def delete_traces(self, owner: str, deployment: str) -> int:
        cond = (traces_t.c.owner == owner) & (traces_t.c.deployment == deployment)
        return self._delete_where(cond)

    def _delete_where(self, cond: Any) -> int:
        """Delete the traces matching `cond` and their feedback."""
        ids = sa.select(traces_t.c.completion_id).where(cond).scalar_subquery()
        with self._write_lock, self._engine.begin() as conn:
            conn.execute(feedback_t.delete().where(feedback_t.c.completion_id.in_(ids)))
            return conn.execute(traces_t.delete().where(cond)).rowcount

    def prune_traces(self, *, keep: int | None, before: dt.datetime | None) -> int:
        """Retention: drop traces older than `before`, and all but the newest `keep` of each deployment."""
        deleted = 0
        if before is not None:
            deleted += self._delete_where(traces_t.c.created_at < before)
        if keep is not None:
            groups = self._rows(
                sa.select(traces_t.c.owner, traces_t.c.deployment, sa.func.count().label("n"))
                .group_by(traces_t.c.owner, traces_t.c.deployment)
                .having(sa.func.count() > keep)
            )
            for g in groups:
                mine = (traces_t.c.owner == g["owner"]) & (traces_t.c.deployment == g["deployment"])
                cutoff = self._rows(
                    sa.select(traces_t.c.seq)
                    .where(mine)
                    .order_by(traces_t.c.seq.desc())
                    .offset(keep)
                    .limit(1)
                )
                if cutoff:
                    deleted += self._delete_where(mine & (traces_t.c.seq <= cutoff[0]["seq"]))
        return deleted

    # ---- feedback
    def add_feedback(self, row: FeedbackRow) -> tuple[FeedbackRow, bool]:
        """Insert `row`; with an idempotency key already used by this owner, return that row instead.
        The flag says whether `row` was new."""
        try:
            with self._write_lock, self._engine.begin() as conn:
                conn.execute(feedback_t.insert().values(**dataclasses.asdict(row)))
            return row, True
        except IntegrityError:
            if row.idempotency_key is None:
                raise
        hit = self._rows(
            feedback_t.select().where(
                feedback_t.c.owner == row.owner, feedback_t.c.idempotency_key == row.idempotency_key
            )
        )
        return _feedback(hit[0]), False

    def feedback_by_key(self, owner: str, key: str) -> FeedbackRow | None:
        rows = self._rows(
            feedback_t.select().where(feedback_t.c.owner == owner, feedback_t.c.idempotency_key == key)
        )
        return _feedback(rows[0]) if rows else None


def _trace(r: Any) -> TraceRow:
    d = {f.name: r[f.name] for f in dataclasses.fields(TraceRow) if f.name != "feedback"}
    for k in _TRACE_JSON:
        d[k] = json.loads(d[k])
    d["created_at"] = as_utc(d["created_at"])
    return TraceRow(**d)


def _feedback(r: Any) -> FeedbackRow:
    d = {f.name: r[f.name] for f in dataclasses.fields(FeedbackRow)}
    d["created_at"] = as_utc(d["created_at"])
    return FeedbackRow(**d)
