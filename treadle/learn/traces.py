"""Following a deployment's traces as they are served: `after_seq` polling, feedback that arrives later.

Each trace is handed out once: as soon as it carries feedback, or — when the reward does not come from users
(a rule or a reward model) — once it has waited `feedback_wait_s` for a correction. In feedback mode a trace
still unrated after that long is given up on (counted in `unrated`). The cursor only moves past traces that
were handed out or given up, so feedback arriving a while after the answer is still seen.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from treadle.learn.batch import Trace


class TraceSource(Protocol):
    def list_traces(
        self,
        deployment: str,
        *,
        after_seq: int = 0,
        has_feedback: bool | None = None,
        version: int | None = None,
        limit: int = 500,
    ) -> tuple[list[Trace], int]: ...


class TraceStream:
    def __init__(
        self,
        source: TraceSource,
        deployment: str,
        *,
        cursor: int = 0,
        consumed: set[int] | None = None,
        feedback_wait_s: float = 120.0,
        hand_out_unrated: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.deployment = deployment
        self.cursor = cursor
        self.consumed = set(consumed or ())
        self.feedback_wait_s = feedback_wait_s
        self.hand_out_unrated = hand_out_unrated
        self.clock = clock
        self.unrated = 0
        self._high = max([cursor, *self.consumed])
        self._pending: dict[int, Trace] = {}
        self._first_seen: dict[int, float] = {}

    def _pages(self, after_seq: int, has_feedback: bool | None) -> list[Trace]:
        out: list[Trace] = []
        while True:
            traces, _ = self.source.list_traces(
                self.deployment, after_seq=after_seq, has_feedback=has_feedback, limit=500
            )
            out.extend(traces)
            if len(traces) < 500:
                return out
            after_seq = max(int(t["seq"]) for t in traces)

    def _track(self, trace: Trace, now: float) -> None:
        seq = int(trace["seq"])
        if seq <= self.cursor or seq in self.consumed:
            return
        self._pending[seq] = trace  # a later copy carries newer feedback
        self._first_seen.setdefault(seq, now)
        self._high = max(self._high, seq)

    def poll(self) -> list[Trace]:
        """New traces that are ready, in seq order; advances the cursor."""
        now = self.clock()
        for t in self._pages(self._high, None):
            self._track(t, now)
        if self._pending:  # feedback may have arrived for traces seen earlier without any
            for t in self._pages(min(self._pending) - 1, True):
                self._track(t, now)
        ready: list[Trace] = []
        for seq in sorted(self._pending):
            trace = self._pending[seq]
            waited = now - self._first_seen[seq]
            if trace.get("feedback") or (self.hand_out_unrated and waited >= self.feedback_wait_s):
                ready.append(trace)
            elif waited >= self.feedback_wait_s:
                self.unrated += 1
            else:
                continue
            del self._pending[seq]
            del self._first_seen[seq]
            self.consumed.add(seq)
        # the cursor moves up to just below the oldest trace still waiting
        floor = (min(self._pending) - 1) if self._pending else self._high
        self.cursor = max(self.cursor, floor)
        self.consumed = {s for s in self.consumed if s > self.cursor}
        return ready
