"""Client sessions: create, heartbeat, finish, list, and expire the silent ones; ending a session frees the
adapters and snapshots its models held in memory (their checkpoint files stay)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from typing import Any

from treadle.service.paging import check_page
from treadle.service.state import ServiceState
from treadle.store import SessionRow, utcnow


class Sessions:
    def __init__(self, state: ServiceState, on_end: Callable[[str, str], object] | None = None) -> None:
        """`on_end(session_id, why)` runs when a session finishes or expires (its queued samples are dropped)."""
        self.s = state
        self._on_end = on_end

    def create_session(self, owner: str, tags: list[str], user_metadata: dict[str, Any]) -> str:
        cap = self.s.admission.limits.max_sessions_per_owner
        self.s.admission.admit_session(len(self.list_sessions(owner, "active", cap, 0)))
        sid = str(uuid.uuid4())
        now = utcnow()
        self.s.store.add_session(SessionRow(sid, owner, "active", now, now, user_metadata, tags))
        return sid

    def heartbeat(self, owner: str, session_id: str) -> None:
        self.s.active_session(owner, session_id)
        self.s.store.touch_session(session_id, utcnow())

    async def finish_session(self, owner: str, session_id: str) -> None:
        row = self.s.session(owner, session_id)
        if row.status == "active":
            self.s.store.set_session_status(session_id, "finished")
            self._release_session(session_id, "session finished")
        if self._on_end is not None:
            self._on_end(session_id, "the session finished")

    def list_sessions(self, owner: str, status: str | None, limit: int, offset: int) -> list[str]:
        check_page(limit, offset)
        return [s.session_id for s in self.s.store.list_sessions(owner, status, limit, offset)]

    def get_session(self, owner: str, session_id: str) -> dict[str, Any]:
        row = self.s.session(owner, session_id)
        return {
            "training_run_ids": self.s.store.runs_of_session(session_id),
            "sampler_ids": self.s.store.samplers_of_session(session_id),
            "user_metadata": {k: str(v) for k, v in row.user_metadata.items()},
            "status": row.status,
        }

    def expire_sessions(self) -> list[str]:
        """Sessions silent for longer than the timeout: mark expired, free their adapters (files stay)."""
        stale = self.s.store.stale_sessions(utcnow() - dt.timedelta(seconds=self.s.cfg.session_timeout_s))
        for sid in stale:
            self.s.store.set_session_status(sid, "expired")
            self._release_session(sid, "session expired: no heartbeat")
            if self._on_end is not None:
                self._on_end(sid, "the session expired (no heartbeat)")
        return stale

    def _release_session(self, session_id: str, reason: str) -> None:
        models = self.s.models
        for mid in [m for m, v in models.items() if v.session_id == session_id]:
            model = models.pop(mid)
            model.worker.close_stream(mid, reason)
            for snap in model.ephemeral:
                loaded = self.s.samplers.pop(snap, None)
                for replica in loaded.replicas if loaded is not None else []:
                    self.s.drop_adapters(replica, [snap])  # its copies on the other replicas (Ray)
            self.s.drop_adapters(model.worker, [mid, *model.ephemeral])
