"""Token-exact traces of the completions served through a deployment, and the feedback users give on them.

A trace holds what the sampler saw and drew: the prompt token ids exactly as rendered, every sampled token id
with its logprob (so a learner never re-tokenizes text), the version that served it and the request as sent.
Feedback (reward, rating, correction, comment) is validated here and stored with its trace. Retention (count
per deployment, age) is enforced by `prune`, which the server's sweeper calls.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import uuid
from typing import Any

from treadle.errors import NotFoundError, UserError, require
from treadle.store.db import utcnow
from treadle.store.traces import FeedbackRow, TraceFilter, TraceRow, TraceStore

# TraceFilter is the query the API builds for `Traces.query`: the service's type, stored by the store's rows
__all__ = ["ServedBy", "TraceFilter", "TraceRecord", "Traces"]

MAX_LIST = 1000
MAX_REWARD = 1e6
MAX_CORRECTION = 100_000
MAX_COMMENT = 10_000
MAX_KEY = 200
FEEDBACK_FIELDS = ("completion_id", "reward", "rating", "correction", "comment", "idempotency_key")


@dataclasses.dataclass
class TraceRecord:
    """One served choice, as the OpenAI front end knows it; the service adds who served it and when."""

    completion_id: str
    endpoint: str  # chat | completions
    request: dict[str, Any]
    prompt_tokens: list[int]
    completion_tokens: list[int]
    completion_logprobs: list[float]
    completion_text: str
    stop_reason: str
    timings: dict[str, float | None]
    user: str | None
    session_id: str | None


@dataclasses.dataclass(frozen=True)
class Retention:
    keep: int | None = None  # traces kept per deployment (newest first); None = no limit
    max_age_s: float | None = None  # None = kept forever

    def __post_init__(self) -> None:
        require(self.keep is None or self.keep >= 1, "trace_keep", f"must be ≥ 1, got {self.keep}")
        require(
            self.max_age_s is None or self.max_age_s > 0,
            "trace_max_age",
            f"must be > 0, got {self.max_age_s}",
        )


@dataclasses.dataclass(frozen=True)
class ServedBy:
    """The deployment version a request was served by."""

    owner: str
    deployment: str
    version: int
    model_path: str
    base_model: str


class Traces:
    def __init__(self, store: TraceStore, retention: Retention | None = None) -> None:
        self.store = store
        self.retention = retention or Retention()
        self.capture = True  # off only to measure what capture costs (`treadle bench traces`)

    def record(self, served: ServedBy, records: list[TraceRecord]) -> None:
        if not self.capture or not records:
            return
        now = utcnow()
        self.store.add_traces(
            [
                TraceRow(
                    owner=served.owner,
                    deployment=served.deployment,
                    version=served.version,
                    model_path=served.model_path,
                    base_model=served.base_model,
                    created_at=now,
                    **dataclasses.asdict(r),
                )
                for r in records
            ]
        )

    def get(self, owner: str, completion_id: str) -> dict[str, Any]:
        row = self.store.get_trace(owner, completion_id)
        if row is None:
            raise NotFoundError(
                f"completion_id: no trace {completion_id!r} for this API key", field="completion_id"
            )
        return trace_json(row)

    def query(self, f: TraceFilter) -> dict[str, Any]:
        require(1 <= f.limit <= MAX_LIST, "limit", f"must be in 1..{MAX_LIST}, got {f.limit}")
        require(f.after_seq >= 0, "after_seq", f"must be ≥ 0, got {f.after_seq}")
        rows = self.store.list_traces(f)
        return {
            "traces": [trace_json(r) for r in rows],
            "next_seq": rows[-1].seq if rows else f.after_seq,
        }

    def delete(self, owner: str, deployment: str) -> int:
        return self.store.delete_traces(owner, deployment)

    def prune(self, now: dt.datetime | None = None) -> int:
        r = self.retention
        if r.keep is None and r.max_age_s is None:
            return 0
        before = None
        if r.max_age_s is not None:
            before = (now or utcnow()) - dt.timedelta(seconds=r.max_age_s)
        return self.store.prune_traces(keep=r.keep, before=before)

    # ---- feedback
    def add_feedback(self, owner: str, body: Any) -> tuple[dict[str, Any], bool]:
        """Validate and store one feedback; returns (Feedback, created). A repeated idempotency key returns
        the Feedback stored the first time, and created=False."""
        row = parse_feedback(owner, body)
        if row.idempotency_key is not None:
            seen = self.store.feedback_by_key(owner, row.idempotency_key)
            if seen is not None:
                return feedback_json(seen), False
        if self.store.get_trace(owner, row.completion_id) is None:
            raise NotFoundError(
                f"completion_id: no completion {row.completion_id!r} for this API key", field="completion_id"
            )
        stored, created = self.store.add_feedback(row)
        return feedback_json(stored), created


def _optional(body: dict[str, Any], name: str, typ: type | tuple[type, ...]) -> Any:
    v = body.get(name)
    if v is None:
        return None
    types = typ if isinstance(typ, tuple) else (typ,)
    if isinstance(v, bool) or not isinstance(v, types):
        names = " or ".join("number" if t is float else t.__name__ for t in types)
        raise UserError(f"{name}: must be {names}, got {type(v).__name__}", field=name)
    return v


def parse_feedback(owner: str, body: Any) -> FeedbackRow:
    """The `POST /v1/feedback` body → a row, or a UserError naming the first bad field."""
    if not isinstance(body, dict):
        raise UserError("body: must be a JSON object", field="body")
    for k in body:
        require(k in FEEDBACK_FIELDS, str(k), f"unknown field; allowed: {', '.join(FEEDBACK_FIELDS)}")
    cid = _optional(body, "completion_id", str)
    require(bool(cid), "completion_id", "required (the `id` of the completion the feedback is about)")
    reward = _optional(body, "reward", (int, float))
    if reward is not None:
        reward = float(reward)
        require(
            math.isfinite(reward) and abs(reward) <= MAX_REWARD,
            "reward",
            f"must be a finite number with |reward| ≤ {MAX_REWARD:g}, got {reward}",
        )
    rating = _optional(body, "rating", int)
    require(rating in (None, 1, -1), "rating", f"must be 1 or -1, got {rating}")
    correction = _optional(body, "correction", str)
    require(
        correction is None or len(correction) <= MAX_CORRECTION,
        "correction",
        f"at most {MAX_CORRECTION} characters",
    )
    comment = _optional(body, "comment", str)
    require(comment is None or len(comment) <= MAX_COMMENT, "comment", f"at most {MAX_COMMENT} characters")
    key = _optional(body, "idempotency_key", str)
    require(key is None or 1 <= len(key) <= MAX_KEY, "idempotency_key", f"1..{MAX_KEY} characters")
    if reward is None and rating is None and correction is None and comment is None:
        raise UserError("body: give at least one of reward, rating, correction, comment", field="body")
    return FeedbackRow(
        feedback_id=f"fb-{uuid.uuid4().hex}",
        completion_id=cid,
        owner=owner,
        reward=reward,
        rating=rating,
        correction=correction,
        comment=comment,
        idempotency_key=key,
        created_at=utcnow(),
    )


def feedback_json(f: FeedbackRow) -> dict[str, Any]:
    return {
        "feedback_id": f.feedback_id,
        "completion_id": f.completion_id,
        "reward": f.reward,
        "rating": f.rating,
        "correction": f.correction,
        "comment": f.comment,
        "created_at": f.created_at.isoformat(),
    }


def trace_json(t: TraceRow) -> dict[str, Any]:
    return {
        "completion_id": t.completion_id,
        "seq": t.seq,
        "deployment": t.deployment,
        "version": t.version,
        "model_path": t.model_path,
        "base_model": t.base_model,
        "created_at": t.created_at.isoformat(),
        "endpoint": t.endpoint,
        "request": t.request,
        "prompt_tokens": t.prompt_tokens,
        "completion_tokens": t.completion_tokens,
        "completion_logprobs": t.completion_logprobs,
        "completion_text": t.completion_text,
        "stop_reason": t.stop_reason,
        "timings": t.timings,
        "user": t.user,
        "session_id": t.session_id,
        "feedback": [feedback_json(f) for f in t.feedback],
    }
