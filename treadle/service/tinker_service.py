"""The Tinker domain, without HTTP: sessions, training runs, sampling sessions, futures, checkpoints,
ownership and TTLs. The API layer decodes wire types into the arguments here and encodes what comes back.

`TinkerService` is the one entry point; each concern lives in its own module (`sessions`, `training`,
`weights`, `sampling`, `checkpoints`) and they share one `ServiceState`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from treadle.engine.types import AdamParams, ForwardBackwardRequest, LoraConfig, SampleRequest
from treadle.engine.worker import Worker, WorkerPool
from treadle.service.auth import Authenticator
from treadle.service.checkpoints import Checkpoints
from treadle.service.custom_losses import CustomLosses
from treadle.service.futures import Outcome
from treadle.service.limits import Admission, Limits
from treadle.service.paths import CheckpointRef
from treadle.service.reconcile import remove_orphan_checkpoints
from treadle.service.sampling import Sampling
from treadle.service.sessions import Sessions
from treadle.service.state import MAX_TTL_S, ResultCodec, ServiceConfig, ServiceState
from treadle.service.training import Training
from treadle.service.weights import Weights
from treadle.store import MetadataStore

__all__ = ["MAX_TTL_S", "ResultCodec", "ServiceConfig", "TinkerService"]

log = logging.getLogger(__name__)

QUEUED_POLL_S = 1.0  # how long a retrieve_future long-poll of a queued request waits before its 408 says why


class TinkerService:
    def __init__(
        self,
        cfg: ServiceConfig,
        store: MetadataStore,
        pool: WorkerPool,
        auth: Authenticator,
        codec: ResultCodec,
        limits: Limits | None = None,
    ) -> None:
        self.auth = auth
        self.admission = Admission(limits or Limits())
        state = ServiceState(cfg, store, pool, codec)
        self._state = state
        self.cfg = state.cfg
        self.store = state.store
        self.pool = state.pool
        self.codec = state.codec
        self.blobs = state.blobs
        self.signer = state.signer
        self.hub = state.hub
        self.completions = state.completions
        self._sessions = Sessions(state)
        self._training = Training(state)
        self._weights = Weights(state)
        self._sampling = Sampling(state, self.admission)
        self._checkpoints = Checkpoints(state)
        self._custom_losses = CustomLosses(state)
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

    # ---- sessions --------------------------------------------------------------------------------------
    def create_session(self, owner: str, tags: list[str], user_metadata: dict[str, Any]) -> str:
        cap = self.admission.limits.max_sessions_per_owner
        self.admission.admit_session(len(self._sessions.list_sessions(owner, "active", cap, 0)))
        return self._sessions.create_session(owner, tags, user_metadata)

    def heartbeat(self, owner: str, session_id: str) -> None:
        self._sessions.heartbeat(owner, session_id)

    async def finish_session(self, owner: str, session_id: str) -> None:
        await self._sessions.finish_session(owner, session_id)
        self._sampling.drop_queued(session_id, "the session finished")

    def list_sessions(self, owner: str, status: str | None, limit: int, offset: int) -> list[str]:
        return self._sessions.list_sessions(owner, status, limit, offset)

    def get_session(self, owner: str, session_id: str) -> dict[str, Any]:
        return self._sessions.get_session(owner, session_id)

    def expire_sessions(self) -> list[str]:
        """Sessions silent for longer than the timeout: mark expired, free their adapters (files stay)."""
        stale = self._sessions.expire_sessions()
        for sid in stale:
            self._sampling.drop_queued(sid, "the session expired (no heartbeat)")
        return stale

    # ---- training --------------------------------------------------------------------------------------
    def create_model(
        self,
        owner: str,
        session_id: str,
        model_seq_id: int,
        base_model: str,
        lora: LoraConfig,
        user_metadata: dict[str, Any],
    ) -> tuple[str, str]:
        self._admit_run(owner)
        return self._training.create_model(owner, session_id, model_seq_id, base_model, lora, user_metadata)

    def get_info(self, owner: str, model_id: str) -> dict[str, Any]:
        return self._training.get_info(owner, model_id)

    def forward_backward(
        self,
        owner: str,
        model_id: str,
        seq_id: int,
        req: ForwardBackwardRequest,
        custom_config: dict[str, float | str] | None = None,
    ) -> str:
        """`custom_config`: loss_fn 'custom''s config (its loss_id), resolved here to the session's uploaded loss."""
        if req.loss_fn == "custom":
            req.custom_loss = self._custom_losses.resolve(owner, model_id, custom_config or {})
        return self._training.forward_backward(owner, model_id, seq_id, req)

    def create_custom_loss(
        self, owner: str, session_id: str, seq_id: int, name: object, inputs: object, graph: object
    ) -> str:
        return self._custom_losses.create(owner, session_id, seq_id, name, inputs, graph)

    def skip_seq(self, owner: str, model_id: object, seq_id: object) -> None:
        """A request for (model_id, seq_id) was refused before it was queued: keep the model's order moving."""
        self._state.skip_seq(owner, model_id, seq_id)

    def optim_step(self, owner: str, model_id: str, seq_id: int, params: AdamParams) -> str:
        return self._training.optim_step(owner, model_id, seq_id, params)

    def save_for_sampler_ephemeral(self, owner: str, model_id: str, seq_id: int, sampling_seq_id: int) -> str:
        return self._training.save_for_sampler_ephemeral(owner, model_id, seq_id, sampling_seq_id)

    # ---- weights ---------------------------------------------------------------------------------------
    def save_weights(
        self,
        owner: str,
        model_id: str,
        seq_id: int,
        name: str,
        *,
        kind: str,
        ttl_seconds: int | None,
        overwrite: bool,
        user_metadata: dict[str, Any],
    ) -> str:
        return self._weights.save_weights(
            owner,
            model_id,
            seq_id,
            name,
            kind=kind,
            ttl_seconds=ttl_seconds,
            overwrite=overwrite,
            user_metadata=user_metadata,
        )

    def save_weights_external(
        self,
        owner: str,
        model_id: str,
        seq_id: int,
        name: str,
        ttl_seconds: int | None,
        recipients: list[str] | None,
    ) -> str:
        return self._weights.save_weights_external(owner, model_id, seq_id, name, ttl_seconds, recipients)

    def load_weights_new(
        self,
        owner: str,
        session_id: str,
        model_seq_id: int,
        path: str,
        optimizer: bool,
        user_metadata: dict[str, Any] | None,
    ) -> tuple[str, str]:
        """Create-via-load (protocol §5.6): a new model `{session}:train:{seq}` from a checkpoint."""
        self._admit_run(owner)
        return self._weights.load_weights_new(owner, session_id, model_seq_id, path, optimizer, user_metadata)

    def load_weights_into(self, owner: str, model_id: str, seq_id: int, path: str, optimizer: bool) -> str:
        """Legacy `TrainingClient.load_state`: replace an existing model's weights, in seq_id order."""
        return self._weights.load_weights_into(owner, model_id, seq_id, path, optimizer)

    def check_loadable(self, owner: str, ref: CheckpointRef, optimizer: bool) -> None:
        self._state.check_loadable(owner, ref, optimizer)

    # ---- sampling and futures --------------------------------------------------------------------------
    async def create_sampling_session(
        self,
        owner: str,
        session_id: str,
        sampling_seq_id: int,
        base_model: str | None,
        model_path: str | None,
    ) -> str:
        return await self._sampling.create_sampling_session(
            owner, session_id, sampling_seq_id, base_model, model_path
        )

    async def checkpoint_adapter(self, worker: Worker, ref: CheckpointRef) -> str:
        """Load a checkpoint into the engine once, shared by every sampler of that path."""
        return await self._sampling.checkpoint_adapter(worker, ref)

    def get_sampler(self, owner: str, sampler_id: str) -> dict[str, Any]:
        return self._sampling.get_sampler(owner, sampler_id)

    async def sample(
        self, owner: str, sampler_id: str, seq_id: int, req: SampleRequest
    ) -> tuple[str, list[str]]:
        """Accepted at once; over the sampling-token budget the work queues (see `treadle.service.token_budget`)."""
        return await self._sampling.sample(owner, sampler_id, seq_id, req)

    def _admit_run(self, owner: str) -> None:
        self.admission.admit_run(sum(1 for m in self._state.models.values() if m.owner == owner))

    async def retrieve_futures(
        self, owner: str, sampler_id: str, prev_cursor: int, timeout_s: float
    ) -> tuple[list[tuple[str, str]], int]:
        """Completed requests of one sampler after `prev_cursor` (long-polls up to `timeout_s`, ≤ 30 s)."""
        return await self._sampling.retrieve_futures(owner, sampler_id, prev_cursor, timeout_s)

    def cancel(self, owner: str, request_id: str) -> bool:
        """Stop a sampling request's generation (protocol §4.3); its future resolves with a `user` error.
        Training ops are never cancelled: later seq_ids depend on them. Unknown or finished ids: no-op."""
        return self._sampling.cancel(owner, request_id)

    async def retrieve(self, owner: str, request_id: str, timeout_s: float | None = None) -> Outcome | None:
        wait_s = timeout_s if timeout_s is not None else self.cfg.retrieve_timeout_s
        if self.queue_reason(owner, request_id) is not None:
            # Queued for room: answer sooner, so the poller sees why it waits (and the SDK polls again at once).
            wait_s = min(wait_s, QUEUED_POLL_S)
        return await self.hub.wait(request_id, owner, wait_s)

    def queue_reason(self, owner: str, request_id: str) -> str | None:
        """Why `owner`'s request still waits for room (the limit and its current use); None if not queued."""
        return self._sampling.queue_reason(owner, request_id)

    # ---- REST: runs and checkpoints -------------------------------------------------------------------
    def capabilities(self) -> list[dict[str, Any]]:
        return self._checkpoints.capabilities()

    def get_run(self, owner: str, run_id: str) -> dict[str, Any]:
        return self._checkpoints.get_run(owner, run_id)

    def list_runs(self, owner: str, limit: int, offset: int) -> dict[str, Any]:
        return self._checkpoints.list_runs(owner, limit, offset)

    def list_checkpoints(
        self, owner: str, run_id: str | None, limit: int = 1000, offset: int = 0
    ) -> dict[str, Any]:
        return self._checkpoints.list_checkpoints(owner, run_id, limit, offset)

    def get_checkpoint(self, owner: str, ref: CheckpointRef) -> dict[str, Any]:
        return self._checkpoints.get_checkpoint(owner, ref)

    def delete_checkpoint(self, owner: str, ref: CheckpointRef) -> None:
        self._checkpoints.delete_checkpoint(owner, ref)

    def set_public(self, owner: str, ref: CheckpointRef, public: bool) -> None:
        self._checkpoints.set_public(owner, ref, public)

    def set_ttl(self, owner: str, ref: CheckpointRef, ttl_seconds: int | None) -> None:
        self._checkpoints.set_ttl(owner, ref, ttl_seconds)

    def sweep_expired_checkpoints(self) -> int:
        return self._checkpoints.sweep_expired_checkpoints()

    def weights_info(self, owner: str, path: str) -> dict[str, Any]:
        return self._checkpoints.weights_info(owner, path)

    def copy_weights(self, owner: str, source_path: str, ttl_seconds: int | None) -> str:
        """Copy a readable checkpoint (e.g. a published one) into a new run the caller owns; the copy keeps its
        kind and name and its run cannot be trained on (no session, never loaded)."""
        return self._checkpoints.copy_weights(owner, source_path, ttl_seconds)

    def external_urls(
        self, owner: str, ref: CheckpointRef, expires_in_s: int = 3600
    ) -> tuple[dict[str, str], int]:
        """Relative file path → signed `blobs/...` path (the API prefixes the base URL); and the expiry."""
        return self._checkpoints.external_urls(owner, ref, expires_in_s)

    def blob_file(self, token: str, rel: str) -> Path:
        return self._checkpoints.blob_file(token, rel)
