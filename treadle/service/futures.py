"""Futures: every work request is answered at once with a request id that resolves later.

Durable rows in the metadata DB (so retries and restarts find them) plus an in-process asyncio event per
pending future, so the hot path (`retrieve_future` long-poll) wakes the moment a worker resolves it,
without polling the DB. The waiters are woken before the row is written: the outcome stays in memory until it is
persisted, so every poll finds it, and a crash in between only fails (at restart) a future whose caller may
already have its result.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import uuid

from treadle.errors import NotFoundError, TreadleError
from treadle.service import results
from treadle.service.results import Result
from treadle.store import MetadataStore

log = logging.getLogger(__name__)

RESTART_MESSAGE = "the server restarted while this request was in flight; submit it again"


@dataclasses.dataclass(frozen=True)
class Outcome:
    """A resolved future: a domain result (`treadle.service.results`) or an error; the API turns it into the
    wire answer."""

    result: Result | None = None
    error: str | None = None
    category: str | None = None  # "user" | "server" | "unknown" when `error` is set


class _Pending:
    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.event = asyncio.Event()
        self.outcome: Outcome | None = None


class FutureHub:
    def __init__(self, store: MetadataStore) -> None:
        self._store = store
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    def recover(self) -> int:
        """Fail whatever a previous process left pending (invariant 4: every future resolves)."""
        return self._store.fail_pending_futures(RESTART_MESSAGE)

    def create(self, owner: str, kind: str, dedupe_key: str | None = None) -> tuple[str, bool]:
        """Record a pending future on the event loop; returns (request_id, created). A retried submission
        (same `dedupe_key`) gets the original request id and `created=False`, and must not run again."""
        self._loop = asyncio.get_running_loop()
        new_id = uuid.uuid4().hex
        request_id = self._store.add_future(new_id, owner, kind, dedupe_key)
        if request_id != new_id:
            return request_id, False
        with self._lock:
            self._pending[request_id] = _Pending(owner)
        return request_id, True

    def resolve(self, request_id: str, outcome: Outcome) -> None:
        """Thread-safe: encode the stored payload (here, on the resolving thread), wake the waiters on the event
        loop, persist, then drop the in-memory entry."""
        text, blob = None, None
        if outcome.error is None and outcome.result is not None:
            try:
                text, blob = results.dump(outcome.result)
            except Exception as e:  # a payload bug must still resolve the future (invariant 4)
                log.exception("storing a result failed")
                outcome = Outcome(error=f"internal error storing the result: {e}", category="server")
        with self._lock:
            entry = self._pending.get(request_id)
        if entry is not None:
            entry.outcome = outcome
            loop = self._loop
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(entry.event.set)
        try:
            self._store.finish_future(
                request_id,
                result_json=text,
                result_proto=blob,
                error=outcome.error,
                category=outcome.category,
            )
        finally:
            with self._lock:
                self._pending.pop(request_id, None)

    def owner_of(self, request_id: str) -> str | None:
        """The owner of a request still pending in this process (None otherwise)."""
        with self._lock:
            entry = self._pending.get(request_id)
        return entry.owner if entry is not None else None

    def fail(self, request_id: str, err: TreadleError) -> None:
        self.resolve(request_id, Outcome(error=err.message, category=err.category))

    async def wait(self, request_id: str, owner: str, timeout_s: float) -> Outcome | None:
        """The outcome, or None if still pending after `timeout_s` (the caller answers 408)."""
        with self._lock:
            entry = self._pending.get(request_id)
        if entry is not None:
            if entry.owner != owner:
                raise NotFoundError(
                    f"request_id: no request {request_id!r} for this API key", field="request_id"
                )
            if entry.outcome is not None:  # resolved; the event loop has not run the wake-up yet
                return entry.outcome
            try:
                await asyncio.wait_for(entry.event.wait(), timeout_s)
            except TimeoutError:
                return None
            assert entry.outcome is not None
            return entry.outcome
        row = self._store.get_future(request_id)
        if row is None or row.owner != owner:
            raise NotFoundError(f"request_id: no request {request_id!r} for this API key", field="request_id")
        if row.state == "pending":
            # In memory until persisted, so a pending row is work this process does not hold (another server
            # on a shared database): the caller answers 408 and the client polls again.
            return None
        if row.state == "error":
            return Outcome(error=row.error, category=row.category or "unknown")
        if row.result_json is None and row.result_proto is None:
            return Outcome()
        try:
            return Outcome(result=results.load(row.result_json, row.result_proto))
        except results.PayloadError as e:
            return Outcome(error=e.message, category="server")
