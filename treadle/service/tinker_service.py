"""The Tinker domain, without HTTP: sessions, training runs, sampling sessions, futures, checkpoints,
ownership and TTLs. The API layer decodes wire types into the arguments here and encodes what comes back: futures resolve with the
domain results of `treadle.service.results`, never wire shapes.

`TinkerService` builds the parts and holds them; callers use the part of their concern directly
(`service.training.forward_backward(...)`, `service.sampling.sample(...)`): each concern lives in its own module
(`sessions`, `training`, `weights`, `sampling`, `checkpoints`, `custom_losses`, `requests`) and they share one
`ServiceState`. The parts talk to models only through `treadle.engine.worker.Worker`.
"""

from __future__ import annotations

import logging
from typing import Any

from treadle.engine.worker import WorkerPool
from treadle.service.auth import Authenticator
from treadle.service.checkpoints import Checkpoints
from treadle.service.custom_losses import CustomLosses
from treadle.service.limits import Admission, Limits
from treadle.service.reconcile import remove_orphan_checkpoints
from treadle.service.requests import Requests
from treadle.service.sampling import Sampling
from treadle.service.sessions import Sessions
from treadle.service.state import MAX_TTL_S, ServiceConfig, ServiceState
from treadle.service.training import Training
from treadle.service.weights import Weights
from treadle.store import MetadataStore

__all__ = ["MAX_TTL_S", "ServiceConfig", "TinkerService"]

log = logging.getLogger(__name__)


class TinkerService:
    def __init__(
        self,
        cfg: ServiceConfig,
        store: MetadataStore,
        pool: WorkerPool,
        auth: Authenticator,
        limits: Limits | None = None,
    ) -> None:
        self.auth = auth
        self.admission = Admission(limits or Limits())
        state = ServiceState(cfg, store, pool, self.admission)
        self._state = state
        self.cfg = state.cfg
        self.store = state.store
        self.pool = state.pool
        self.blobs = state.blobs
        self.hub = state.hub
        self.completions = state.completions
        self.custom_losses = CustomLosses(state)
        self.sampling = Sampling(state, self.admission)
        self.sessions = Sessions(state, on_end=self.sampling.drop_queued)
        self.training = Training(state, self.custom_losses)
        self.weights = Weights(state)
        self.checkpoints = Checkpoints(state)
        self.requests = Requests(state, self.sampling)
        pool.on_lost(state.worker_lost)
        remove_orphan_checkpoints(state.store, state.blobs.root)
        recovered = self.hub.recover()
        if recovered:
            log.warning("%d requests were in flight when the server last stopped; they now fail", recovered)

    def workers(self) -> list[dict[str, Any]]:
        """Each worker's model, replica, placement, pid and state (`serving` or `lost` with why)."""
        return [w.status() for w in self.pool.all()]

    def close(self) -> None:
        self.pool.close()
        self._state.resolver.shutdown(wait=True)
        self.store.close()
