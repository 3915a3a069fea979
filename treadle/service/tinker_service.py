"""The Tinker domain, without HTTP: sessions, training runs, sampling sessions, futures, checkpoints,
ownership and TTLs. The API layer decodes wire types into the arguments here and encodes what comes back.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import datetime as dt
import logging
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from treadle.engine.types import (
    AdamParams,
    ForwardBackwardRequest,
    ForwardBackwardResult,
    LoraConfig,
    SampleRequest,
    SampleResult,
)
from treadle.errors import ConflictError, GoneError, NotFoundError, TreadleError, UserError, require
from treadle.service import paths, views
from treadle.service.auth import Authenticator
from treadle.service.completions import CompletionLog
from treadle.service.export import UrlSigner, encrypt_dir, publish_dir
from treadle.service.futures import FutureHub, Outcome
from treadle.service.paths import CheckpointRef
from treadle.service.workers import Worker, WorkerPool
from treadle.store import BlobStore, CheckpointRow, MetadataStore, RunRow, SamplerRow, SessionRow, utcnow

log = logging.getLogger(__name__)

MAX_TTL_S = 10 * 365 * 24 * 3600


class ResultCodec(Protocol):
    """How results become future payloads; the API layer supplies it (protobuf lives at the edge)."""

    def forward_backward(self, res: ForwardBackwardResult) -> Outcome: ...

    def sample(self, res: SampleResult, req: SampleRequest) -> Outcome: ...


@dataclasses.dataclass
class ServiceConfig:
    data_dir: Path
    session_timeout_s: float = 600.0
    retrieve_timeout_s: float = 25.0  # < the SDK's 45 s retrieve_future timeout (protocol §1.5)
    ephemeral_samplers_per_model: int = 4
    max_num_samples: int = 128


@dataclasses.dataclass
class _Model:
    run_id: str
    session_id: str
    worker: Worker
    ephemeral: collections.deque[str] = dataclasses.field(default_factory=collections.deque)


@dataclasses.dataclass
class _Sampler:
    worker: Worker
    adapter_id: str | None  # None = the base model


class TinkerService:
    def __init__(
        self,
        cfg: ServiceConfig,
        store: MetadataStore,
        pool: WorkerPool,
        auth: Authenticator,
        codec: ResultCodec,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.pool = pool
        self.auth = auth
        self.codec = codec
        self.blobs = BlobStore(cfg.data_dir / "checkpoints")
        self.signer = UrlSigner(cfg.data_dir / "url-signing.key")
        self.hub = FutureHub(store)
        # in-flight sampling futures by request id, so cancel_future can stop their generation
        self._sampling: dict[str, concurrent.futures.Future[Any]] = {}
        self._models: dict[str, _Model] = {}
        self._samplers: dict[str, _Sampler] = {}
        self.completions = CompletionLog()
        # Encoding a sample result and persisting it happens here, off the sampler thread, so generation
        # never waits on the metadata DB.
        self._resolver = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="treadle-resolve"
        )
        recovered = self.hub.recover()
        if recovered:
            log.warning("%d requests were in flight when the server last stopped; they now fail", recovered)

    def close(self) -> None:
        self.pool.close()
        self._resolver.shutdown(wait=True)
        self.store.close()

    # ---- helpers ---------------------------------------------------------------------------------------
    def _done(self, request_id: str, to_outcome: Callable[[Any], Outcome]) -> Callable[[object], None]:
        def done(outcome: object) -> None:
            if isinstance(outcome, TreadleError):
                self.hub.fail(request_id, outcome)
                return
            try:
                self.hub.resolve(request_id, to_outcome(outcome))
            except TreadleError as e:
                self.hub.fail(request_id, e)
            except Exception as e:  # an encoding bug must still resolve the future (invariant 4)
                log.exception("encoding a result failed")
                self.hub.fail(request_id, TreadleError(f"internal error encoding the result: {e}"))

        return done

    def _json_done(self, request_id: str) -> Callable[[object], None]:
        return self._done(request_id, lambda r: Outcome(json=r))

    def _submit(self, owner: str, kind: str, dedupe: str, submit: Callable[[str], None]) -> str:
        """Create (or find, for a retry) the future, then queue the work; a queueing error fails the future."""
        rid, new = self.hub.create(owner, kind, dedupe)
        if new:
            try:
                submit(rid)
            except TreadleError as e:
                self.hub.fail(rid, e)
        return rid

    def _session(self, owner: str, session_id: str) -> SessionRow:
        row = self.store.get_session(session_id)
        if row is None or row.owner != owner:
            raise NotFoundError(f"session_id: no session {session_id!r} for this API key", field="session_id")
        return row

    def _active_session(self, owner: str, session_id: str) -> SessionRow:
        row = self._session(owner, session_id)
        if row.status != "active":
            raise GoneError(
                f"session_id: session {session_id!r} is {row.status}; create a new session",
                field="session_id",
            )
        return row

    def _run(self, owner: str, run_id: str, field: str = "model_id") -> RunRow:
        row = self.store.get_run(run_id)
        if row is None or row.owner != owner:
            raise NotFoundError(f"{field}: no training run {run_id!r} for this API key", field=field)
        return row

    def _model(self, owner: str, model_id: str) -> _Model:
        self._run(owner, model_id)
        m = self._models.get(model_id)
        if m is None:
            raise NotFoundError(
                f"model_id: {model_id!r} is no longer loaded (its session ended or the server restarted); "
                "load it from a checkpoint with create_training_client_from_state",
                field="model_id",
            )
        return m

    def _checkpoint(self, owner: str, ref: CheckpointRef, *, write: bool = False) -> CheckpointRow:
        row = self.store.get_checkpoint(ref.run_id, ref.kind, ref.name)
        visible = row is not None and (row.owner == owner or (row.public and not write))
        if row is None or not visible or (row.expires_at is not None and row.expires_at < utcnow()):
            raise NotFoundError(f"path: no checkpoint {ref.path!r} for this API key", field="path")
        if not self.blobs.exists(ref.run_id, ref.kind, ref.name):
            raise NotFoundError(f"path: checkpoint {ref.path!r} has no stored files", field="path")
        return row

    def _expiry(self, ttl_seconds: int | None) -> dt.datetime | None:
        if ttl_seconds is None:
            return None
        require(
            isinstance(ttl_seconds, int) and 0 < ttl_seconds <= MAX_TTL_S,
            "ttl_seconds",
            f"must be null (keep forever) or an integer in 1..{MAX_TTL_S}",
        )
        return utcnow() + dt.timedelta(seconds=ttl_seconds)

    # ---- sessions --------------------------------------------------------------------------------------
    def create_session(self, owner: str, tags: list[str], user_metadata: dict[str, Any]) -> str:
        sid = str(uuid.uuid4())
        now = utcnow()
        self.store.add_session(SessionRow(sid, owner, "active", now, now, user_metadata, tags))
        return sid

    def heartbeat(self, owner: str, session_id: str) -> None:
        self._active_session(owner, session_id)
        self.store.touch_session(session_id, utcnow())

    async def finish_session(self, owner: str, session_id: str) -> None:
        row = self._session(owner, session_id)
        if row.status == "active":
            self.store.set_session_status(session_id, "finished")
            self._release_session(session_id, "session finished")

    def list_sessions(self, owner: str, status: str | None, limit: int, offset: int) -> list[str]:
        return [s.session_id for s in self.store.list_sessions(owner, status, limit, offset)]

    def get_session(self, owner: str, session_id: str) -> dict[str, Any]:
        row = self._session(owner, session_id)
        return {
            "training_run_ids": self.store.runs_of_session(session_id),
            "sampler_ids": self.store.samplers_of_session(session_id),
            "user_metadata": {k: str(v) for k, v in row.user_metadata.items()},
            "status": row.status,
        }

    def expire_sessions(self) -> list[str]:
        """Sessions silent for longer than the timeout: mark expired, free their adapters (files stay)."""
        stale = self.store.stale_sessions(utcnow() - dt.timedelta(seconds=self.cfg.session_timeout_s))
        for sid in stale:
            self.store.set_session_status(sid, "expired")
            self._release_session(sid, "session expired: no heartbeat")
        return stale

    def _release_session(self, session_id: str, reason: str) -> None:
        for mid in [m for m, v in self._models.items() if v.session_id == session_id]:
            model = self._models.pop(mid)
            model.worker.scheduler.close(mid, reason)
            for snap in model.ephemeral:
                self._samplers.pop(snap, None)
            self._drop_adapters(model.worker, [mid, *model.ephemeral])

    def _drop_adapters(self, worker: Worker, adapter_ids: list[str]) -> None:
        engine = worker.engine

        def drop() -> None:
            for a in adapter_ids:
                if engine.has_adapter(a):
                    engine.remove_adapter(a)

        worker.submit_call("", None, drop, lambda _o: None)

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
        self._active_session(owner, session_id)
        worker = self.pool.get(base_model)
        lora.validate(getattr(worker.engine.bank, "max_rank", 128))
        mid = paths.model_id(session_id, model_seq_id)

        def call() -> dict[str, Any]:
            if self.store.get_run(mid) is not None:
                raise ConflictError(f"model_seq_id: model {mid!r} already exists", field="model_seq_id")
            worker.engine.create_adapter(mid, lora)
            self._register_model(owner, session_id, mid, worker, lora, user_metadata)
            return {"model_id": mid, "type": "create_model"}

        rid = self._submit(
            owner,
            "create_model",
            f"create:{mid}",
            lambda r: worker.submit_call(mid, None, call, self._json_done(r)),
        )
        return rid, mid

    def _register_model(
        self,
        owner: str,
        session_id: str,
        mid: str,
        worker: Worker,
        lora: LoraConfig,
        user_metadata: dict[str, Any],
    ) -> None:
        now = utcnow()
        self.store.add_run(
            RunRow(mid, session_id, owner, worker.name, dataclasses.asdict(lora), user_metadata, now, now)
        )
        worker.scheduler.open(mid, 1)
        self._models[mid] = _Model(mid, session_id, worker)

    def get_info(self, owner: str, model_id: str) -> dict[str, Any]:
        run = self._run(owner, model_id)
        worker = self.pool.get(run.base_model)
        info = worker.engine.info
        return {
            "model_id": model_id,
            "model_data": {
                "arch": info.arch,
                "model_name": info.model_name,
                "tokenizer_id": info.tokenizer_dir,
            },
            "is_lora": True,
            "lora_rank": run.lora_config.get("rank"),
            "model_name": info.model_name,
            "type": "get_info",
        }

    def _ordered(
        self,
        owner: str,
        model_id: str,
        seq_id: int,
        kind: str,
        call: Callable[[_Model], object],
        to_outcome: Callable[[Any], Outcome] | None = None,
    ) -> str:
        model = self._model(owner, model_id)
        require(isinstance(seq_id, int) and seq_id >= 1, "seq_id", f"must be an integer ≥ 1, got {seq_id!r}")
        self.store.touch_run(model_id)
        done_for = (lambda r: self._done(r, to_outcome)) if to_outcome else self._json_done
        return self._submit(
            owner,
            kind,
            f"op:{model_id}:{seq_id}",
            lambda r: model.worker.submit_call(model_id, seq_id, lambda: call(model), done_for(r)),
        )

    def forward_backward(self, owner: str, model_id: str, seq_id: int, req: ForwardBackwardRequest) -> str:
        model = self._model(owner, model_id)
        require(isinstance(seq_id, int) and seq_id >= 1, "seq_id", f"must be an integer ≥ 1, got {seq_id!r}")
        req.adapter_id = model_id
        self.store.touch_run(model_id)
        return self._submit(
            owner,
            "forward_backward",
            f"op:{model_id}:{seq_id}",
            lambda r: model.worker.submit_fb(
                model_id, seq_id, req, self._done(r, self.codec.forward_backward)
            ),
        )

    def optim_step(self, owner: str, model_id: str, seq_id: int, params: AdamParams) -> str:
        params.validate()
        return self._ordered(
            owner,
            model_id,
            seq_id,
            "optim_step",
            lambda m: {"metrics": m.worker.engine.optim_step(model_id, params), "type": "optim_step"},
        )

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
        ref = CheckpointRef(model_id, kind, paths.check_name(name))
        expires = self._expiry(ttl_seconds)

        def call(m: _Model) -> dict[str, Any]:
            if not overwrite and self.store.get_checkpoint(ref.run_id, ref.kind, ref.name) is not None:
                raise ConflictError(
                    f"path: checkpoint {ref.path!r} already exists; pass overwrite=True", field="path"
                )
            m.worker.engine.save_adapter(
                model_id, self.blobs.path(ref.run_id, kind, ref.name), optimizer=kind == "weights"
            )
            self._record_checkpoint(owner, ref, expires, user_metadata)
            self._forget_loaded_checkpoint(m.worker, ref)
            return {
                "path": ref.path,
                "type": "save_weights" if kind == "weights" else "save_weights_for_sampler",
            }

        return self._ordered(owner, model_id, seq_id, "save_weights", call)

    def _forget_loaded_checkpoint(self, worker: Worker, ref: CheckpointRef) -> None:
        """An overwritten checkpoint must not keep serving its old weights from the engine (worker thread)."""
        stale = f"ckpt:{ref.path}"
        if worker.engine.has_adapter(stale):
            worker.engine.remove_adapter(stale)
            self._samplers = {k: v for k, v in self._samplers.items() if v.adapter_id != stale}

    def _record_checkpoint(
        self, owner: str, ref: CheckpointRef, expires: dt.datetime | None, user_metadata: dict[str, Any]
    ) -> None:
        self.store.upsert_checkpoint(
            CheckpointRow(
                ref.run_id,
                ref.kind,
                ref.name,
                owner,
                utcnow(),
                self.blobs.size(ref.run_id, ref.kind, ref.name),
                False,
                expires,
                {k: str(v) for k, v in user_metadata.items()},
            )
        )

    def save_for_sampler_ephemeral(self, owner: str, model_id: str, seq_id: int, sampling_seq_id: int) -> str:
        model = self._model(owner, model_id)
        sid = paths.sampler_id(model.session_id, sampling_seq_id)

        def call(m: _Model) -> dict[str, Any]:
            engine = m.worker.engine
            engine.snapshot_adapter(model_id, sid)
            self.store.add_sampler(SamplerRow(sid, m.session_id, owner, m.worker.name, None, "snapshot"))
            self._samplers[sid] = _Sampler(m.worker, sid)
            m.ephemeral.append(sid)
            # Snapshots are in-memory copies made every RL step; keep the few recent ones an off-policy
            # loop may still sample from.
            while len(m.ephemeral) > self.cfg.ephemeral_samplers_per_model:
                old = m.ephemeral.popleft()
                self._samplers.pop(old, None)
                if engine.has_adapter(old):
                    engine.remove_adapter(old)
            return {"sampling_session_id": sid, "type": "save_weights_for_sampler"}

        return self._ordered(owner, model_id, seq_id, "save_weights_for_sampler", call)

    def save_weights_external(
        self,
        owner: str,
        model_id: str,
        seq_id: int,
        name: str,
        ttl_seconds: int | None,
        recipients: list[str] | None,
    ) -> str:
        ref = CheckpointRef(model_id, "external_weights", paths.check_name(name))
        expires = self._expiry(ttl_seconds)

        def call(m: _Model) -> dict[str, Any]:
            final = self.blobs.path(ref.run_id, ref.kind, ref.name)
            tmp = final.with_name(f".{ref.name}.tmp-{uuid.uuid4().hex[:8]}")
            plain = tmp.with_name(tmp.name + "-plain")
            try:
                m.worker.engine.save_adapter(model_id, plain, optimizer=False)
                if recipients:
                    encrypt_dir(plain, tmp, recipients)
                else:
                    plain.rename(tmp)
                publish_dir(tmp, final)
            finally:
                shutil.rmtree(plain, ignore_errors=True)
                shutil.rmtree(tmp, ignore_errors=True)
            self._record_checkpoint(owner, ref, expires, {})
            return {
                "path": ref.path,
                "size_bytes": self.blobs.size(ref.run_id, ref.kind, ref.name),
                "type": "save_weights_external",
            }

        return self._ordered(owner, model_id, seq_id, "save_weights_external", call)

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
        self._active_session(owner, session_id)
        ref = paths.parse_path(path)
        self.check_loadable(owner, ref, optimizer)
        src = self.store.get_run(ref.run_id)
        if src is None:
            raise NotFoundError(f"path: the training run of {path!r} no longer exists", field="path")
        worker = self.pool.get(src.base_model, "path")
        mid = paths.model_id(session_id, model_seq_id)
        directory = self.blobs.path(ref.run_id, ref.kind, ref.name)
        meta = user_metadata if user_metadata is not None else src.user_metadata

        def call() -> dict[str, Any]:
            if self.store.get_run(mid) is not None:
                raise ConflictError(f"model_seq_id: model {mid!r} already exists", field="model_seq_id")
            lora = worker.engine.load_adapter(mid, directory, optimizer=optimizer)
            self._register_model(owner, session_id, mid, worker, lora, meta)
            return {"path": path, "model_id": mid, "type": "load_weights"}

        rid = self._submit(
            owner,
            "load_weights",
            f"create:{mid}",
            lambda r: worker.submit_call(mid, None, call, self._json_done(r)),
        )
        return rid, mid

    def load_weights_into(self, owner: str, model_id: str, seq_id: int, path: str, optimizer: bool) -> str:
        """Legacy `TrainingClient.load_state`: replace an existing model's weights, in seq_id order."""
        ref = paths.parse_path(path)
        self.check_loadable(owner, ref, optimizer)
        directory = self.blobs.path(ref.run_id, ref.kind, ref.name)

        def call(m: _Model) -> dict[str, Any]:
            engine = m.worker.engine
            engine.remove_adapter(model_id)
            engine.load_adapter(model_id, directory, optimizer=optimizer)
            return {"path": path, "model_id": model_id, "type": "load_weights"}

        return self._ordered(owner, model_id, seq_id, "load_weights", call)

    def check_loadable(self, owner: str, ref: CheckpointRef, optimizer: bool) -> None:
        if ref.kind == "external_weights" or (optimizer and ref.kind != "weights"):
            allowed = "a weights/ checkpoint" if optimizer else "a weights/ or sampler_weights/ checkpoint"
            raise UserError(
                f"path: loading{' with optimizer' if optimizer else ''} needs {allowed}, got {ref.path!r}",
                field="path",
            )
        self._checkpoint(owner, ref)

    # ---- sampling --------------------------------------------------------------------------------------
    async def create_sampling_session(
        self,
        owner: str,
        session_id: str,
        sampling_seq_id: int,
        base_model: str | None,
        model_path: str | None,
    ) -> str:
        self._active_session(owner, session_id)
        sid = paths.sampler_id(session_id, sampling_seq_id)
        existing = self.store.get_sampler(sid)
        if existing is not None:
            return sid  # a retried create
        if model_path:
            ref = paths.parse_path(model_path, "model_path")
            target = await self._checkpoint_sampler(owner, ref)
        else:
            if not base_model:
                raise UserError("base_model: give a base_model or a model_path", field="base_model")
            target = _Sampler(self.pool.get(base_model), None)
        self.store.add_sampler(
            SamplerRow(
                sid,
                session_id,
                owner,
                target.worker.name,
                model_path or None,
                "checkpoint" if model_path else "base",
            )
        )
        self._samplers[sid] = target
        return sid

    async def _checkpoint_sampler(self, owner: str, ref: CheckpointRef) -> _Sampler:
        self.check_loadable(owner, ref, optimizer=False)
        run = self.store.get_run(ref.run_id)
        if run is None:
            raise NotFoundError(
                f"model_path: the training run of {ref.path!r} no longer exists", field="model_path"
            )
        worker = self.pool.get(run.base_model, "model_path")
        adapter_id = await self.checkpoint_adapter(worker, ref)
        return _Sampler(worker, adapter_id)

    async def checkpoint_adapter(self, worker: Worker, ref: CheckpointRef) -> str:
        """Load a checkpoint into the engine once, shared by every sampler of that path."""
        adapter_id = f"ckpt:{ref.path}"
        directory = self.blobs.path(ref.run_id, ref.kind, ref.name)
        engine = worker.engine

        def load() -> None:
            if not engine.has_adapter(adapter_id):
                engine.load_adapter(adapter_id, directory, optimizer=False)

        await worker.run(load)
        return adapter_id

    async def _sampler(self, owner: str, sampler_id: str) -> _Sampler:
        row = self.store.get_sampler(sampler_id)
        if row is None or row.owner != owner:
            raise NotFoundError(
                f"sampling_session_id: no sampler {sampler_id!r} for this API key",
                field="sampling_session_id",
            )
        target = self._samplers.get(sampler_id)
        if target is not None:
            return target
        if row.source == "checkpoint" and row.model_path:  # after a restart: reload from the checkpoint
            target = await self._checkpoint_sampler(owner, paths.parse_path(row.model_path, "model_path"))
        elif row.source == "snapshot":
            raise NotFoundError(
                f"sampling_session_id: {sampler_id!r} sampled in-memory weights that were released "
                "(newer snapshots replaced them, the session ended or the server restarted)",
                field="sampling_session_id",
            )
        else:
            target = _Sampler(self.pool.get(row.base_model), None)
        self._samplers[sampler_id] = target
        return target

    def get_sampler(self, owner: str, sampler_id: str) -> dict[str, Any]:
        row = self.store.get_sampler(sampler_id)
        if row is None or row.owner != owner:
            raise NotFoundError(f"sampler_id: no sampler {sampler_id!r} for this API key", field="sampler_id")
        out: dict[str, Any] = {"sampler_id": sampler_id, "base_model": row.base_model}
        if row.model_path:
            out["model_path"] = row.model_path
        return out

    async def sample(
        self, owner: str, sampler_id: str, seq_id: int, req: SampleRequest
    ) -> tuple[str, list[str]]:
        target = await self._sampler(owner, sampler_id)
        engine = target.worker.engine
        self._validate_sample(req, engine.info.vocab_size, engine.info.max_context_length)
        req.adapter_id = target.adapter_id
        rid, new = self.hub.create(owner, "sample", f"sample:{sampler_id}:{seq_id}")
        if new:
            self.completions.bind()
            resolve = self._done(rid, lambda res: self.codec.sample(res, req))

            def done(outcome: object) -> None:
                self._sampling.pop(rid, None)
                resolve(outcome)
                self.completions.record_threadsafe(sampler_id, rid, isinstance(outcome, TreadleError))

            try:
                fut = engine.sample(req)
            except TreadleError as e:
                done(e)
            else:
                self._sampling[rid] = fut
                fut.add_done_callback(lambda f: self._resolver.submit(done, _future_outcome(f)))
        return rid, [f"{rid}:{i}" for i in range(req.num_samples)]

    async def retrieve_futures(
        self, owner: str, sampler_id: str, prev_cursor: int, timeout_s: float
    ) -> tuple[list[tuple[str, str]], int]:
        """Completed requests of one sampler after `prev_cursor` (long-polls up to `timeout_s`, ≤ 30 s)."""
        row = self.store.get_sampler(sampler_id)
        if row is None or row.owner != owner:
            raise NotFoundError(
                f"target.sampling_session_id: no sampler {sampler_id!r} for this API key",
                field="target.sampling_session_id",
            )
        return await self.completions.since(sampler_id, prev_cursor, min(max(timeout_s, 0.0), 30.0))

    def _validate_sample(self, req: SampleRequest, vocab: int, max_ctx: int) -> None:
        req.params.validate(vocab)
        require(
            isinstance(req.num_samples, int) and 1 <= req.num_samples <= self.cfg.max_num_samples,
            "num_samples",
            f"must be an integer in 1..{self.cfg.max_num_samples}, got {req.num_samples!r}",
        )
        require(len(req.prompt) > 0, "prompt", "must contain at least one token")
        bad = [t for t in req.prompt if not 0 <= t < vocab]
        require(not bad, "prompt", f"token ids must be in 0..{vocab - 1}, got {bad[:5]}")
        total = len(req.prompt) + req.params.max_tokens
        require(
            total <= max_ctx,
            "sampling_params.max_tokens",
            f"prompt ({len(req.prompt)} tokens) + max_tokens ({req.params.max_tokens}) = {total} exceeds the "
            f"model's max_context_length {max_ctx}",
        )
        require(0 <= req.topk_prompt_logprobs <= 100, "topk_prompt_logprobs", "must be in 0..100")

    def cancel(self, owner: str, request_id: str) -> bool:
        """Stop a sampling request's generation (protocol §4.3); its future resolves with a `user` error.
        Training ops are never cancelled: later seq_ids depend on them. Unknown or finished ids: no-op."""
        if self.hub.owner_of(request_id) != owner:
            return False
        fut = self._sampling.get(request_id)
        return fut.cancel() if fut is not None else False

    async def retrieve(self, owner: str, request_id: str, timeout_s: float | None = None) -> Outcome | None:
        return await self.hub.wait(
            request_id, owner, timeout_s if timeout_s is not None else self.cfg.retrieve_timeout_s
        )

    # ---- REST: runs and checkpoints -------------------------------------------------------------------
    def capabilities(self) -> list[dict[str, Any]]:
        return [
            {
                "model_name": w.name,
                "max_context_length": w.engine.info.max_context_length,
                "trainable": True,
                "sampleable": True,
            }
            for w in self.pool.workers.values()
        ]

    def _run_json(self, run: RunRow) -> dict[str, Any]:
        cks, _ = self.store.list_checkpoints(run_id=run.run_id)
        return views.run_json(run, cks)

    def get_run(self, owner: str, run_id: str) -> dict[str, Any]:
        return self._run_json(self._run(owner, run_id, "training_run_id"))

    def list_runs(self, owner: str, limit: int, offset: int) -> dict[str, Any]:
        _check_page(limit, offset)
        runs, total = self.store.list_runs(owner, limit, offset)
        return {
            "training_runs": [self._run_json(r) for r in runs],
            "cursor": {"offset": offset, "limit": limit, "total_count": total},
        }

    def list_checkpoints(
        self, owner: str, run_id: str | None, limit: int = 1000, offset: int = 0
    ) -> dict[str, Any]:
        _check_page(limit, offset)
        if run_id is not None:
            self._run(owner, run_id, "training_run_id")
        now = utcnow()
        rows, total = self.store.list_checkpoints(run_id=run_id, owner=owner, limit=limit, offset=offset)
        live = [r for r in rows if r.expires_at is None or r.expires_at >= now]
        return {
            "checkpoints": [views.checkpoint_json(r) for r in live],
            "cursor": {"offset": offset, "limit": limit, "total_count": total},
        }

    def get_checkpoint(self, owner: str, ref: CheckpointRef) -> dict[str, Any]:
        return views.checkpoint_json(self._checkpoint(owner, ref))

    def delete_checkpoint(self, owner: str, ref: CheckpointRef) -> None:
        self._checkpoint(owner, ref, write=True)
        self._delete_checkpoint(ref)

    def _delete_checkpoint(self, ref: CheckpointRef) -> None:
        self.store.delete_checkpoint(ref.run_id, ref.kind, ref.name)
        self.blobs.delete(ref.run_id, ref.kind, ref.name)
        adapter_id = f"ckpt:{ref.path}"
        for w in self.pool.workers.values():
            if w.engine.has_adapter(adapter_id):
                self._samplers = {k: v for k, v in self._samplers.items() if v.adapter_id != adapter_id}
                self._drop_adapters(w, [adapter_id])

    def set_public(self, owner: str, ref: CheckpointRef, public: bool) -> None:
        self._checkpoint(owner, ref, write=True)
        self.store.update_checkpoint(ref.run_id, ref.kind, ref.name, public=public)

    def set_ttl(self, owner: str, ref: CheckpointRef, ttl_seconds: int | None) -> None:
        self._checkpoint(owner, ref, write=True)
        self.store.update_checkpoint(ref.run_id, ref.kind, ref.name, expires_at=self._expiry(ttl_seconds))

    def sweep_expired_checkpoints(self) -> int:
        expired = self.store.expired_checkpoints(utcnow())
        for row in expired:
            self._delete_checkpoint(CheckpointRef(row.run_id, row.kind, row.name))
        return len(expired)

    def weights_info(self, owner: str, path: str) -> dict[str, Any]:
        ref = paths.parse_path(path, "tinker_path")
        self._checkpoint(owner, ref)
        run = self.store.get_run(ref.run_id)
        if run is None:
            raise NotFoundError(
                f"tinker_path: the training run of {path!r} no longer exists", field="tinker_path"
            )
        lc = run.lora_config
        return {
            "base_model": run.base_model,
            "is_lora": True,
            "lora_rank": lc.get("rank"),
            "train_unembed": lc.get("train_unembed"),
            "train_mlp": lc.get("train_mlp"),
            "train_attn": lc.get("train_attn"),
        }

    def copy_weights(self, owner: str, source_path: str, ttl_seconds: int | None) -> str:
        """Copy a readable checkpoint (e.g. a published one) into a new run the caller owns; the copy keeps its
        kind and name and its run cannot be trained on (no session, never loaded)."""
        src = paths.parse_path(source_path, "source_path")
        self._checkpoint(owner, src)
        src_run = self.store.get_run(src.run_id)
        if src_run is None:
            raise NotFoundError(
                f"source_path: the training run of {source_path!r} no longer exists", field="source_path"
            )
        expires = self._expiry(ttl_seconds)
        now = utcnow()
        dst = CheckpointRef(f"copy-{uuid.uuid4().hex[:16]}", src.kind, src.name)
        self.store.add_run(
            RunRow(
                dst.run_id,
                "",
                owner,
                src_run.base_model,
                src_run.lora_config,
                src_run.user_metadata,
                now,
                now,
            )
        )
        target = self.blobs.path(dst.run_id, dst.kind, dst.name)
        tmp = target.with_name(f".{dst.name}.tmp")
        shutil.copytree(self.blobs.path(src.run_id, src.kind, src.name), tmp)
        publish_dir(tmp, target)
        self._record_checkpoint(owner, dst, expires, {})
        return dst.path

    def external_urls(
        self, owner: str, ref: CheckpointRef, expires_in_s: int = 3600
    ) -> tuple[dict[str, str], int]:
        """Relative file path → signed `blobs/...` path (the API prefixes the base URL); and the expiry."""
        if ref.kind != "external_weights":
            raise UserError(
                "checkpoint_id: only external_weights/ checkpoints have download URLs", field="checkpoint_id"
            )
        self._checkpoint(owner, ref)
        root = self.blobs.path(ref.run_id, ref.kind, ref.name)
        expires = int(time.time()) + expires_in_s
        urls: dict[str, str] = {}
        for f in sorted(root.rglob("*")):
            if f.is_file():
                rel = f"{ref.run_id}/{ref.kind}/{ref.name}/{f.relative_to(root)}"
                urls[str(f.relative_to(root))] = f"blobs/{self.signer.sign(rel, expires)}/{rel}"
        return urls, expires

    def blob_file(self, token: str, rel: str) -> Path:
        parts = rel.split("/")
        if len(parts) < 4 or ".." in parts or not self.signer.verify(rel, token, time.time()):
            raise NotFoundError("url: this download link is invalid or has expired", field="url")
        path = self.blobs.root.joinpath(*parts)
        if not path.is_file():
            raise NotFoundError("url: this file no longer exists", field="url")
        return path


def _future_outcome(f: Any) -> object:
    try:
        return f.result()
    except concurrent.futures.CancelledError:
        return UserError("request_id: the request was cancelled (cancel_future)", field="request_id")
    except TreadleError as e:
        return e
    except Exception as e:
        return TreadleError(f"sampling failed: {type(e).__name__}: {e}")


def _check_page(limit: int, offset: int) -> None:
    require(1 <= limit <= 10_000, "limit", f"must be in 1..10000, got {limit}")
    require(offset >= 0, "offset", f"must be ≥ 0, got {offset}")
