"""Client sessions: create, heartbeat, finish, list, and expire the silent ones; ending a session frees the
adapters and snapshots its models held in memory (their checkpoint files stay)."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from treadle.service.paging import check_page
from treadle.service.state import ServiceState
from treadle.store import SessionRow, utcnow


class Sessions:
    def __init__(self, state: ServiceState) -> None:
        self.s = state

    def create_session(self, owner: str, tags: list[str], user_metadata: dict[str, Any]) -> str:
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
        return stale

    def _release_session(self, session_id: str, reason: str) -> None:
        models = self.s.models
        for mid in [m for m, v in models.items() if v.session_id == session_id]:
            model = models.pop(mid)
            model.worker.close_stream(mid, reason)
            for snap in model.ephemeral:
                self.s.samplers.pop(snap, None)
            self.s.drop_adapters(model.worker, [mid, *model.ephemeral])
