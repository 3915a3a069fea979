"""What every part of the Tinker service shares: its config, stores, loaded models and samplers, and the
lookups and future plumbing each concern (sessions, training, weights, sampling, checkpoints) builds on."""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from treadle.engine.types import LoraConfig
from treadle.engine.worker import Worker, WorkerPool
from treadle.errors import GoneError, NotFoundError, TreadleError, UserError, require
from treadle.service.completions import CompletionLog
from treadle.service.export import UrlSigner
from treadle.service.futures import FutureHub, Outcome
from treadle.service.limits import Admission, Limits
from treadle.service.paths import CheckpointRef
from treadle.service.results import Result
from treadle.store import BlobStore, CheckpointRow, MetadataStore, RunRow, SessionRow, utcnow

log = logging.getLogger(__name__)

MAX_TTL_S = 10 * 365 * 24 * 3600
# A run's `last_request_time` is refreshed at most this often.
TOUCH_INTERVAL_S = 1.0


@dataclasses.dataclass
class ServiceConfig:
    data_dir: Path
    session_timeout_s: float = 600.0
    retrieve_timeout_s: float = 25.0  # < the SDK's 45 s retrieve_future timeout (protocol §1.5)
    ephemeral_samplers_per_model: int = 4
    max_num_samples: int = 128
    # ImageAssetPointerChunk files are read only under it (see api/tinker/images.py)
    image_dir: Path | None = None


@dataclasses.dataclass
class LoadedModel:
    run_id: str
    session_id: str
    owner: str
    worker: Worker
    touched: float = 0.0  # time.monotonic() of the last `last_request_time` write
    ephemeral: collections.deque[str] = dataclasses.field(default_factory=collections.deque)


@dataclasses.dataclass
class LoadedSampler:
    worker: Worker
    adapter_id: str | None  # None = the base model
    # other replicas holding the same weights (Ray, --replicas N: a run's snapshots are copied to every replica
    # through Ray's object store, so sampling them spreads over the replicas while training stays on its own)
    replicas: list[Worker] = dataclasses.field(default_factory=list)

    def pick(self) -> Worker:
        """A replica not running a training op if there is one (rollouts overlap training that way), then the
        one with the fewest samples in flight; ties go to the run's own replica."""
        return min([self.worker, *self.replicas], key=lambda w: (w.training_busy, w.samples_in_flight))


class ServiceState:
    def __init__(
        self,
        cfg: ServiceConfig,
        store: MetadataStore,
        pool: WorkerPool,
        admission: Admission | None = None,
    ) -> None:
        self.cfg = cfg
        self.admission = admission or Admission(Limits())
        self.store = store
        self.pool = pool
        self.blobs = BlobStore(cfg.data_dir / "checkpoints")
        self.signer = UrlSigner(cfg.data_dir / "url-signing.key")
        self.hub = FutureHub(store)
        # in-flight sampling futures by request id, so cancel_future can stop their generation
        self.sampling: dict[str, concurrent.futures.Future[Any]] = {}
        self.models: dict[str, LoadedModel] = {}
        self.samplers: dict[str, LoadedSampler] = {}
        # runs whose worker process died, and why: their next op says so (bounded: newest kept)
        self.lost_runs: collections.OrderedDict[str, str] = collections.OrderedDict()
        self.completions = CompletionLog()
        # Storing a sample result's payload and persisting it happens here, off the sampler thread, so generation
        # never waits on the metadata DB.
        self.resolver = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="treadle-resolve"
        )

    # ---- futures ---------------------------------------------------------------------------------------
    def done(
        self, request_id: str, to_result: Callable[[Any], Result] | None = None
    ) -> Callable[[object], None]:
        """The callback that resolves `request_id` with what an op returned (a domain result, or what
        `to_result` makes one of) or with the TreadleError it failed with."""

        def done(outcome: object) -> None:
            if isinstance(outcome, TreadleError):
                self.hub.fail(request_id, outcome)
                return
            try:
                result = to_result(outcome) if to_result is not None else cast(Result, outcome)
            except TreadleError as e:
                self.hub.fail(request_id, e)
                return
            except Exception as e:  # a bug must still resolve the future (invariant 4)
                log.exception("building a result failed")
                self.hub.fail(request_id, TreadleError(f"internal error building the result: {e}"))
                return
            self.hub.resolve(request_id, Outcome(result=result))

        return done

    def submit(self, owner: str, kind: str, dedupe: str, submit: Callable[[str], None]) -> str:
        """Create (or find, for a retry) the future, then queue the work; a queueing error fails the future."""
        rid, new = self.hub.create(owner, kind, dedupe)
        if new:
            try:
                submit(rid)
            except TreadleError as e:
                self.hub.fail(rid, e)
        return rid

    def admit_run(self, owner: str) -> None:
        """Refuse (429) a new resident training run past the owner's limit (`--max-runs-per-owner`)."""
        self.admission.admit_run(sum(1 for m in self.models.values() if m.owner == owner))

    def skip_seq(self, owner: str, model_id: object, seq_id: object) -> None:
        """Count a rejected op's seq_id: queue a no-op in its place so the ops after it still run.

        The SDK numbers every op of a training client and never resends one the server refused (a 4xx is
        final), so an unused seq_id would hold every later op of that model back forever. Only the caller's
        own loaded model is touched, and a seq_id that was already used is left alone."""
        if not isinstance(model_id, str) or type(seq_id) is not int or seq_id < 1:
            return
        m = self.models.get(model_id)
        if m is None or m.owner != owner:
            return
        try:
            m.worker.submit_call(model_id, seq_id, lambda: None, lambda _outcome: None)
        except TreadleError:
            pass  # that seq_id is already queued or done: nothing to fill

    def ordered(
        self,
        owner: str,
        model_id: str,
        seq_id: int,
        kind: str,
        call: Callable[[LoadedModel], Result],
    ) -> str:
        """Queue `call` on the model's worker in seq_id order (protocol: one op per seq_id, retries dedupe)."""
        model = self.model(owner, model_id)
        require(isinstance(seq_id, int) and seq_id >= 1, "seq_id", f"must be an integer ≥ 1, got {seq_id!r}")
        self.touch(model)
        return self.submit(
            owner,
            kind,
            f"op:{model_id}:{seq_id}",
            lambda r: model.worker.submit_call(model_id, seq_id, lambda: call(model), self.done(r)),
        )

    # ---- lookups (owner-checked) -----------------------------------------------------------------------
    def session(self, owner: str, session_id: str) -> SessionRow:
        row = self.store.get_session(session_id)
        if row is None or row.owner != owner:
            raise NotFoundError(f"session_id: no session {session_id!r} for this API key", field="session_id")
        return row

    def active_session(self, owner: str, session_id: str) -> SessionRow:
        row = self.session(owner, session_id)
        if row.status != "active":
            raise GoneError(
                f"session_id: session {session_id!r} is {row.status}; create a new session",
                field="session_id",
            )
        return row

    def run(self, owner: str, run_id: str, field: str = "model_id") -> RunRow:
        row = self.store.get_run(run_id)
        if row is None or row.owner != owner:
            raise NotFoundError(f"{field}: no training run {run_id!r} for this API key", field=field)
        return row

    def model(self, owner: str, model_id: str) -> LoadedModel:
        """The loaded model, owner-checked: from memory on the hot path, from the store for a useful error."""
        m = self.models.get(model_id)
        if m is not None and m.owner == owner:
            return m
        self.run(owner, model_id)  # raises 404 for an unknown run or another owner's
        if m is None:
            lost = self.lost_runs.get(model_id)
            why = f"its worker was lost ({lost})" if lost else "its session ended or the server restarted"
            raise NotFoundError(
                f"model_id: {model_id!r} is no longer loaded ({why}); "
                "load it from a checkpoint with create_training_client_from_state",
                field="model_id",
            )
        return m

    def touch(self, model: LoadedModel) -> None:
        """Record activity in the run's `last_request_time`, at most once per `TOUCH_INTERVAL_S` (a DB write
        per op would sit on every request's path for a timestamp listed to the second)."""
        now = time.monotonic()
        if now - model.touched >= TOUCH_INTERVAL_S:
            model.touched = now
            self.store.touch_run(model.run_id)

    def checkpoint(self, owner: str, ref: CheckpointRef, *, write: bool = False) -> CheckpointRow:
        row = self.store.get_checkpoint(ref.run_id, ref.kind, ref.name)
        visible = row is not None and (row.owner == owner or (row.public and not write))
        if row is None or not visible or (row.expires_at is not None and row.expires_at < utcnow()):
            raise NotFoundError(f"path: no checkpoint {ref.path!r} for this API key", field="path")
        if not self.blobs.exists(ref.run_id, ref.kind, ref.name):
            raise NotFoundError(f"path: checkpoint {ref.path!r} has no stored files", field="path")
        return row

    def check_loadable(self, owner: str, ref: CheckpointRef, optimizer: bool) -> None:
        if ref.kind == "external_weights" or (optimizer and ref.kind != "weights"):
            allowed = "a weights/ checkpoint" if optimizer else "a weights/ or sampler_weights/ checkpoint"
            raise UserError(
                f"path: loading{' with optimizer' if optimizer else ''} needs {allowed}, got {ref.path!r}",
                field="path",
            )
        self.checkpoint(owner, ref)

    def expiry(self, ttl_seconds: int | None) -> dt.datetime | None:
        if ttl_seconds is None:
            return None
        require(
            isinstance(ttl_seconds, int) and 0 < ttl_seconds <= MAX_TTL_S,
            "ttl_seconds",
            f"must be null (keep forever) or an integer in 1..{MAX_TTL_S}",
        )
        return utcnow() + dt.timedelta(seconds=ttl_seconds)

    # ---- shared mutations ------------------------------------------------------------------------------
    def register_model(
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
        worker.open(mid, 1)
        self.models[mid] = LoadedModel(mid, session_id, owner, worker, touched=time.monotonic())

    def record_checkpoint(
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

    def worker_lost(self, worker: Worker, why: str) -> None:
        """The process behind `worker` died: the runs and sampler adapters that lived in it are gone. Their
        queued ops fail now (category `server`, naming why); checkpoint samplers reload from disk on next use;
        runs continue from their last saved checkpoint (`create_training_client_from_state`)."""
        from treadle.engine.placement.api import WorkerLostError

        err = WorkerLostError(f"{why}; this op was queued on it and never ran")
        for mid, m in list(self.models.items()):
            if m.worker is worker:
                self.models.pop(mid, None)
                self.lost_runs[mid] = why
                worker.close_stream(mid, why, err)
        while len(self.lost_runs) > 10_000:
            self.lost_runs.popitem(last=False)
        kept: dict[str, LoadedSampler] = {}
        for k, v in self.samplers.items():
            if v.worker is not worker:
                v.replicas = [w for w in v.replicas if w is not worker]
                kept[k] = v
        self.samplers = kept

    def forget_samplers_of(self, adapter_id: str) -> None:
        self.samplers = {k: v for k, v in self.samplers.items() if v.adapter_id != adapter_id}

    def drop_adapters(self, worker: Worker, adapter_ids: list[str]) -> None:
        engine = worker

        def drop() -> None:
            for a in adapter_ids:
                if engine.has_adapter(a):
                    engine.remove_adapter(a)

        worker.submit_call("", None, drop, lambda _o: None)
