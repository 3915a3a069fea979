"""Sampling sessions (base model, checkpoint or in-memory snapshot), sample requests, their cancellation,
and retrieving futures; a sample resolves on the resolver thread so generation never waits on the DB. A sample
is accepted even when the server is out of sampling tokens: it then waits in the admission queue (its future
polls as `paused_capacity`) and starts when room frees."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from typing import Any

from treadle.engine import validate
from treadle.engine.types import SampleRequest
from treadle.engine.worker import Worker
from treadle.errors import NotFoundError, TreadleError, UserError
from treadle.service import paths
from treadle.service.limits import Admission
from treadle.service.paths import CheckpointRef
from treadle.service.results import Sampled
from treadle.service.state import LoadedSampler, ServiceState
from treadle.store import SamplerRow

log = logging.getLogger(__name__)


class Sampling:
    def __init__(self, state: ServiceState, admission: Admission) -> None:
        self.s = state
        self.admission = admission  # sampling tokens in flight, and the queue of samples waiting for room

    async def create_sampling_session(
        self,
        owner: str,
        session_id: str,
        sampling_seq_id: int,
        base_model: str | None,
        model_path: str | None,
    ) -> str:
        s = self.s
        s.active_session(owner, session_id)
        sid = paths.sampler_id(session_id, sampling_seq_id)
        existing = s.store.get_sampler(sid)
        if existing is not None:
            return sid  # a retried create
        if model_path:
            ref = paths.parse_path(model_path, "model_path")
            target = await self._checkpoint_sampler(owner, ref)
        else:
            if not base_model:
                raise UserError("base_model: give a base_model or a model_path", field="base_model")
            target = LoadedSampler(s.pool.any_replica(base_model), None)
        s.store.add_sampler(
            SamplerRow(
                sid,
                session_id,
                owner,
                target.worker.name,
                model_path or None,
                "checkpoint" if model_path else "base",
            )
        )
        s.samplers[sid] = target
        return sid

    async def _checkpoint_sampler(self, owner: str, ref: CheckpointRef) -> LoadedSampler:
        self.s.check_loadable(owner, ref, optimizer=False)
        run = self.s.store.get_run(ref.run_id)
        if run is None:
            raise NotFoundError(
                f"model_path: the training run of {ref.path!r} no longer exists", field="model_path"
            )
        worker = self.s.pool.any_replica(run.base_model, "model_path")
        adapter_id = await self.checkpoint_adapter(worker, ref)
        return LoadedSampler(worker, adapter_id)

    async def checkpoint_adapter(self, worker: Worker, ref: CheckpointRef) -> str:
        """Load a checkpoint into the engine once, shared by every sampler of that path."""
        adapter_id = f"ckpt:{ref.path}"
        directory = self.s.blobs.path(ref.run_id, ref.kind, ref.name)
        engine = worker

        def load() -> None:
            if not engine.has_adapter(adapter_id):
                engine.load_adapter(adapter_id, directory, optimizer=False)

        await worker.run(load)
        return adapter_id

    async def _sampler(self, owner: str, sampler_id: str) -> LoadedSampler:
        row = self.s.store.get_sampler(sampler_id)
        if row is None or row.owner != owner:
            raise NotFoundError(
                f"sampling_session_id: no sampler {sampler_id!r} for this API key",
                field="sampling_session_id",
            )
        target = self.s.samplers.get(sampler_id)
        if target is not None:
            return target
        if row.source == "checkpoint" and row.model_path:  # after a restart: reload from the checkpoint
            target = await self._checkpoint_sampler(owner, paths.parse_path(row.model_path, "model_path"))
        elif row.source == "snapshot":
            raise NotFoundError(
                f"sampling_session_id: {sampler_id!r} sampled in-memory weights that were released (newer "
                f"snapshots replaced them: {self.s.cfg.ephemeral_samplers_per_model} are kept per run, see "
                "treadle serve --ephemeral-samplers; or the session ended or the server restarted)",
                field="sampling_session_id",
            )
        else:
            target = LoadedSampler(self.s.pool.any_replica(row.base_model), None)
        self.s.samplers[sampler_id] = target
        return target

    def get_sampler(self, owner: str, sampler_id: str) -> dict[str, Any]:
        row = self.s.store.get_sampler(sampler_id)
        if row is None or row.owner != owner:
            raise NotFoundError(f"sampler_id: no sampler {sampler_id!r} for this API key", field="sampler_id")
        out: dict[str, Any] = {"sampler_id": sampler_id, "base_model": row.base_model}
        if row.model_path:
            out["model_path"] = row.model_path
        return out

    async def sample(
        self, owner: str, sampler_id: str, seq_id: int, req: SampleRequest
    ) -> tuple[str, list[str]]:
        s = self.s
        target = await self._sampler(owner, sampler_id)
        engine = target.worker
        if req.images:  # image chunks → placeholder tokens (bad images: a 400 naming the chunk); decoding and
            # resizing are CPU work, kept off the event loop
            await asyncio.to_thread(engine.prepare_sample, req)
        validate.sample_request(  # the same checks as the sampler's own guard, here before any future exists
            req,
            vocab_size=engine.info.vocab_size,
            max_context_length=engine.info.max_context_length,
            max_num_samples=s.cfg.max_num_samples,
        )
        req.adapter_id = target.adapter_id
        tokens = max(1, int(req.num_samples)) * (len(req.prompt) + int(req.params.max_tokens))
        budget = self.admission.budget
        self.admission.check_queue_room(owner)  # before the future exists: a refusal leaves nothing behind
        rid, new = s.hub.create(owner, "sample", f"sample:{sampler_id}:{seq_id}")
        if new:
            s.completions.bind()
            resolve = s.done(
                rid,
                lambda res: Sampled(
                    res,
                    req.topk_sample_logprobs,
                    req.topk_prompt_logprobs,
                    req.target_prompt_logprobs,
                    req.target_prompt_sparse,
                ),
            )

            def done(outcome: object) -> None:
                s.sampling.pop(rid, None)
                resolve(outcome)
                s.completions.record_threadsafe(sampler_id, rid, isinstance(outcome, TreadleError))

            def finished(f: concurrent.futures.Future[Any]) -> None:
                budget.release(owner, tokens)  # first, so queued work starts while this one resolves
                s.resolver.submit(done, _future_outcome(f))

            def start() -> None:
                # Runs now or, if the server is out of sampling tokens, when room frees (on the event loop). It
                # never raises once it owns the tokens: the budget would release them a second time.
                try:
                    fut = target.pick().sample(req)
                except Exception as e:
                    budget.release(owner, tokens)
                    try:
                        done(e if isinstance(e, TreadleError) else TreadleError(f"sampling failed: {e}"))
                    except Exception:
                        log.exception("sampling: could not resolve request %s", rid)
                    return
                s.sampling[rid] = fut
                fut.add_done_callback(finished)  # a callback's exception is logged by the future, not raised

            # Dropped from the queue (cancel_future, the session ended): it never held tokens.
            self.admission.queue_sample(rid, owner, tokens, start, done, sampler_id.rsplit(":sample:", 1)[0])
        return rid, [f"{rid}:{i}" for i in range(req.num_samples)]

    def queue_reason(self, owner: str, request_id: str) -> str | None:
        """Why a sample of `owner` still waits for room (None if it is not queued)."""
        if self.s.hub.owner_of(request_id) != owner:
            return None
        return self.admission.budget.reason(request_id)

    def drop_queued(self, session_id: str, why: str) -> int:
        """Fail a session's samples still queued for room (its session ended); returns how many."""
        err = UserError(
            f"request_id: {why} while this sample was queued for room; it never ran", field="request_id"
        )
        return self.admission.budget.cancel_group(session_id, err)

    async def retrieve_futures(
        self, owner: str, sampler_id: str, prev_cursor: int, timeout_s: float
    ) -> tuple[list[tuple[str, str]], int]:
        """Completed requests of one sampler after `prev_cursor` (long-polls up to `timeout_s`, ≤ 30 s)."""
        row = self.s.store.get_sampler(sampler_id)
        if row is None or row.owner != owner:
            raise NotFoundError(
                f"target.sampling_session_id: no sampler {sampler_id!r} for this API key",
                field="target.sampling_session_id",
            )
        return await self.s.completions.since(sampler_id, prev_cursor, min(max(timeout_s, 0.0), 30.0))

    def cancel(self, owner: str, request_id: str) -> bool:
        """Stop a sampling request's generation (protocol §4.3); its future resolves with a `user` error.
        Training ops are never cancelled: later seq_ids depend on them. Unknown or finished ids: no-op."""
        if self.s.hub.owner_of(request_id) != owner:
            return False
        cancelled = UserError("request_id: the request was cancelled (cancel_future)", field="request_id")
        if self.admission.budget.cancel(request_id, cancelled):
            return True  # still queued for room: it never started
        fut = self.s.sampling.get(request_id)
        return fut.cancel() if fut is not None else False


def _future_outcome(f: Any) -> object:
    try:
        return f.result()
    except concurrent.futures.CancelledError:
        return UserError("request_id: the request was cancelled (cancel_future)", field="request_id")
    except TreadleError as e:
        return e
    except Exception as e:
        return TreadleError(f"sampling failed: {type(e).__name__}: {e}")
