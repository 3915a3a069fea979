"""What every queued request shares, whatever its kind: retrieving its outcome (long-poll), and keeping a training
run's seq_id order moving when one of its ops was refused before it was queued."""

from __future__ import annotations

from treadle.service.futures import Outcome
from treadle.service.sampling import Sampling
from treadle.service.state import ServiceState

QUEUED_POLL_S = 1.0  # how long a retrieve_future long-poll of a queued request waits before its 408 says why


class Requests:
    def __init__(self, state: ServiceState, sampling: Sampling) -> None:
        self.s = state
        self._sampling = sampling

    async def retrieve(self, owner: str, request_id: str, timeout_s: float | None = None) -> Outcome | None:
        wait_s = timeout_s if timeout_s is not None else self.s.cfg.retrieve_timeout_s
        if self.queue_reason(owner, request_id) is not None:
            # Queued for room: answer sooner, so the poller sees why it waits (and the SDK polls again at once).
            wait_s = min(wait_s, QUEUED_POLL_S)
        return await self.s.hub.wait(request_id, owner, wait_s)

    def queue_reason(self, owner: str, request_id: str) -> str | None:
        """Why `owner`'s request still waits for room (the limit and its current use); None if not queued."""
        return self._sampling.queue_reason(owner, request_id)

    def cancel(self, owner: str, request_id: str) -> bool:
        """Stop a sampling request's generation (protocol §4.3); its future resolves with a `user` error.
        Training ops are never cancelled: later seq_ids depend on them. Unknown or finished ids: no-op."""
        return self._sampling.cancel(owner, request_id)

    def skip_seq(self, owner: str, model_id: object, seq_id: object) -> None:
        """A request for (model_id, seq_id) was refused before it was queued: keep the model's order moving."""
        self.s.skip_seq(owner, model_id, seq_id)
