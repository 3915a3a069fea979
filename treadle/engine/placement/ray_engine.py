"""Ray placement (`treadle serve --ray [ADDRESS] --replicas N`): each replica of a base model is a Ray actor that
holds a real `Engine`; `RayEngine` is its `EngineAPI` on the caller's side, so the worker and service above it
cannot tell it from an in-process engine.

    from treadle.engine.placement import ray_engine

    ray_engine.connect(None)  # or "ray://head:10001" / "auto": join an existing cluster
    spec = EngineSpec("HuggingFaceTB/SmolLM2-135M-Instruct")
    replicas = [ray_engine.RayEngine(spec, replica=i, num_cpus=1) for i in range(2)]
    replicas[0].create_adapter("a", LoraConfig(rank=8))
    replicas[0].forward_backward([ForwardBackwardRequest("a", data, "cross_entropy")])
    replicas[0].snapshot_adapter("a", "a@1")
    replicas[1].import_adapter("a@1", replicas[0].export_adapter("a@1"))  # through Ray's object store
    fut = replicas[1].sample(SampleRequest("a@1", prompt, SamplingParams(max_tokens=16)), on_token)

Placement: an actor asks Ray for the devices its spec needs (`num_gpus=1` for a cuda device, `num_cpus`
otherwise), so Ray puts replicas where those devices are free. A cuda actor sees only the GPU Ray gave it
(Ray sets CUDA_VISIBLE_DEVICES), so it builds its engine on "cuda".

Calls (adapter ops, forward_backward, optim_step, health) block the calling thread on `ray.get` (the worker's
scheduler thread makes them one at a time, so seq_id order holds). The actor is threaded (`max_concurrency`
well above the number of calls that can block at once), so a long forward_backward never holds up a sample
submission, a cancel or a health check; the engine's compute thread orders the tensor work inside.

Errors travel as values, not as Ray task exceptions: the actor returns ("ok", result) or ("err", fields) and the
fields are rebuilt as the same `TreadleError` subclass, message and field (`placement.wire`, shared with the
subprocess placement); a Ray task error would wrap them and a pickled exception can lose its `field`.

Token streaming: actor-side buffering drained by one long-poll (`_EngineActor.poll`), not one Ray streaming
generator per sample. Why: (1) the tokens of all concurrent samples of a decode step come back in one round trip
instead of one object-store entry and one RPC per token per sample, and one parent thread drains them all
instead of one thread blocked per sample (64 concurrent samples: 1 thread, not 64); (2) the order of events is
the order the sampler emitted them, so a sample's tokens always precede its result; (3) one poll is always
outstanding, so the actor's death is seen within milliseconds even when no call is in flight, which is what the
fault contract needs. Samples are submitted with a fire-and-forget `.remote()` straight to the engine's
continuous-batching sampler, so many concurrent samples batch together. `future.cancel()` sends a cancel that
stops the generation in the actor (the sampler's own cancel).

Faults: when the actor dies (kill -9, a crash, the out-of-memory killer, its node lost), every call in flight and
every unfinished sample fails with `WorkerLostError` (category `server`) naming the replica, the actor's pid and
what Ray reported; the lost handler runs; a fresh actor with the same spec starts in the background (no
adapters: runs continue from their last saved checkpoint). Calls made while it starts fail fast with the same
error saying so. Ray's own actor restarts are off (`max_restarts=0`): restarting here is what lets the service
hear about the loss before a fresh, empty engine answers. With `spec.memory_headroom_mb` the actor caps its
address space as the subprocess worker does, so an oversized request fails alone with an out-of-memory error
and the actor keeps serving.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
import ray.exceptions

from treadle.engine.placement.api import EngineSpec, WorkerLostError
from treadle.engine.placement.remote import Pending, RemoteEngine
from treadle.engine.placement.wire import ErrorFields, pack_error, unpack_error
from treadle.engine.types import ForwardBackwardRequest, LoraConfig, SampleRequest, SampleResult
from treadle.errors import TreadleError

if TYPE_CHECKING:
    from treadle.engine.engine import EngineInfo
    from treadle.engine.sampler import TokenCallback

log = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0  # placing an actor and loading a large model can take minutes
HEALTH_TIMEOUT_S = (
    30.0  # health reads counters without waiting for compute: a slower answer is a wedged actor
)
POLL_S = 2.0  # the long poll's wait when there is nothing to report
MAX_CONCURRENCY = 64  # actor threads: one poll + one training call + submissions, cancels, health checks
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")


# ---- the Ray runtime ---------------------------------------------------------------------------------------
def connect(
    address: str | None,
    *,
    temp_dir: str | Path | None = None,
    num_cpus: int | None = None,
    object_store_memory: int | None = None,
) -> None:
    """Join the Ray cluster at `address` ("auto", "HOST:PORT", "ray://HOST:PORT"), or start a local Ray runtime
    (no dashboard, warnings only, every CPU of this machine unless `num_cpus`, its own temp dir under `temp_dir`
    or /tmp). Does nothing when Ray is already initialized in this process."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phoning home from a self-hosted server
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return
    # Ray's unix socket paths live under the temp dir and must stay short (107 bytes): a short unique name
    root = Path(temp_dir) if temp_dir is not None else Path(tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    ray.init(
        num_cpus=num_cpus or os.cpu_count() or 1,
        include_dashboard=False,
        logging_level=logging.WARNING,
        object_store_memory=object_store_memory,
        _temp_dir=tempfile.mkdtemp(prefix="ray-", dir=root),
    )


def shutdown() -> None:
    """Leave the cluster (a local runtime that `connect` started stops with it)."""
    if ray.is_initialized():
        ray.shutdown()


# ---- the actor -----------------------------------------------------------------------------------------------
class _EngineActor:
    """Runs in the actor's process: one `Engine`, answering `RayEngine`'s calls. Every method returns its
    failure as a value (see the module docstring); `__init__` never raises, `ready` reports a failed start."""

    def __init__(self, spec: EngineSpec) -> None:
        from treadle.engine.placement.local import make_engine

        self._cond = threading.Condition()
        self._events: list[tuple[Any, ...]] = []
        self._samples: dict[int, concurrent.futures.Future[SampleResult]] = {}
        # cancels that overtook their sample (a threaded actor keeps no call order), or came after it ended:
        # sid -> when; the late ones are forgotten after a minute
        self._cancelled: dict[int, float] = {}
        self._failed: ErrorFields | None = None
        self._headroom_mb = spec.memory_headroom_mb
        self.engine: Any = None
        try:
            self.engine = make_engine(spec)
        except BaseException as e:  # noqa: BLE001 - the caller must learn why the replica could not start
            self._failed = pack_error(e)

    def ready(self) -> tuple[Any, ...]:
        if self._failed is not None:
            return ("failed", self._failed)
        if self._headroom_mb is not None:
            # Capped here, not in __init__: Ray starts the actor's thread pool (its stacks count against
            # RLIMIT_AS) only after __init__ returns, and a thread it then could not create would abort it.
            from treadle.engine.placement.child import _limit_memory  # the subprocess worker's own cap

            _limit_memory(self._headroom_mb)
            self._headroom_mb = None
        return ("ready", self.engine.info, os.getpid())

    def call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        try:
            return ("ok", getattr(self.engine, method)(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - every failure is the caller's answer
            return ("err", pack_error(e))

    def forward_backward(self, requests: list[ForwardBackwardRequest]) -> tuple[Any, ...]:
        """Per-request refusals (a TreadleError in the result list) travel packed too, by index."""
        try:
            results = self.engine.forward_backward(requests)
        except BaseException as e:  # noqa: BLE001
            return ("err", pack_error(e))
        errors = {i: pack_error(r) for i, r in enumerate(results) if isinstance(r, BaseException)}
        return ("ok", [None if i in errors else r for i, r in enumerate(results)], errors)

    # sampling ---------------------------------------------------------------------------------------------
    def _emit(self, event: tuple[Any, ...]) -> None:
        with self._cond:
            self._events.append(event)
            self._cond.notify_all()

    def sample(self, sid: int, req: SampleRequest, stream: bool) -> None:
        def on_token(i: int, tok: int, lp: float) -> None:
            self._emit(("tok", sid, i, tok, lp))

        try:
            fut = self.engine.sample(req, on_token if stream else None)
        except BaseException as e:  # noqa: BLE001
            self._emit(("err", sid, pack_error(e)))
            return
        with self._cond:
            early = self._cancelled.pop(sid, None) is not None
            if not early:
                self._samples[sid] = fut
        if early:
            self.engine.sampler.cancel(fut)
            return
        fut.add_done_callback(lambda f: self._sample_done(sid, f))

    def _sample_done(self, sid: int, fut: concurrent.futures.Future[SampleResult]) -> None:
        with self._cond:
            self._samples.pop(sid, None)
        if fut.cancelled():
            return  # the caller cancelled it and no longer waits for an answer
        e = fut.exception()
        self._emit(("err", sid, pack_error(e)) if e is not None else ("ok", sid, fut.result()))

    def cancel(self, sid: int) -> None:
        with self._cond:
            fut = self._samples.pop(sid, None)
            if fut is None:
                now = time.monotonic()
                self._cancelled = {k: t for k, t in self._cancelled.items() if now - t < 60.0}
                self._cancelled[sid] = now
        if fut is not None:
            self.engine.sampler.cancel(fut)

    def poll(self, timeout: float) -> list[tuple[Any, ...]]:
        """Every event since the last poll, in emission order; waits up to `timeout` s for the first one."""
        with self._cond:
            if not self._events:
                self._cond.wait(timeout)
            out, self._events = self._events, []
        return out

    # adapters across replicas -----------------------------------------------------------------------------------
    def export_adapter(self, adapter_id: str, optimizer: bool) -> tuple[Any, ...]:
        """The adapter's checkpoint files as {relative path: bytes} (its PEFT layout, as `save_adapter` writes)."""
        try:
            with tempfile.TemporaryDirectory(prefix="treadle-export-") as tmp:
                d = Path(tmp) / "adapter"
                self.engine.save_adapter(adapter_id, d, optimizer=optimizer)
                files = {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}
            return ("ok", files)
        except BaseException as e:  # noqa: BLE001
            return ("err", pack_error(e))

    def import_adapter(self, adapter_id: str, payload: tuple[Any, ...], optimizer: bool) -> tuple[Any, ...]:
        if payload[0] != "ok":
            return payload  # the export failed: its error is the answer
        try:
            with tempfile.TemporaryDirectory(prefix="treadle-import-") as tmp:
                d = Path(tmp) / "adapter"
                for rel, data in payload[1].items():
                    (d / rel).parent.mkdir(parents=True, exist_ok=True)
                    (d / rel).write_bytes(data)
                return ("ok", self.engine.load_adapter(adapter_id, d, optimizer=optimizer))
        except BaseException as e:  # noqa: BLE001
            return ("err", pack_error(e))

    def model_files(self) -> dict[str, bytes]:
        """The model's files except its weights (config, tokenizer, processor): for a caller on another node."""
        d = Path(self.engine.info.tokenizer_dir)
        return {
            p.name: p.read_bytes()
            for p in d.iterdir()
            if p.is_file() and not p.name.endswith(_WEIGHT_SUFFIXES) and p.stat().st_size < 64 * 2**20
        }


_REMOTE: Any = None


def _actor_class() -> Any:
    global _REMOTE
    if _REMOTE is None:
        remote: Any = ray.remote  # its typed overloads do not cover actor options given as keywords
        _REMOTE = remote(max_concurrency=MAX_CONCURRENCY, max_restarts=0)(_EngineActor)
    return _REMOTE


# ---- the caller's side --------------------------------------------------------------------------------------------
def _describe_death(e: BaseException) -> str:
    """Ray's multi-paragraph report → one line: what happened to the process, as Ray saw it."""
    text = str(e)
    for marker in ("The actor is dead because ", "The actor died because "):
        if marker in text:
            text = text.split(marker, 1)[1]
            break
    first = text.split(" Some common causes include", 1)[0].strip().rstrip(".")
    first = " ".join(first.split())[:300]
    if "SYSTEM_ERROR" in first or "unexpectedly" in first:
        first += " (killed, e.g. kill -9 or the out-of-memory killer, or crashed)"
    return first or type(e).__name__


class RayEngine(RemoteEngine):
    placement = "ray"

    def __init__(
        self,
        spec: EngineSpec,
        *,
        replica: int,
        num_cpus: float = 1,
        env: dict[str, str] | None = None,
        restart: bool = True,
    ) -> None:
        """One replica of `spec`'s model in a Ray actor (`connect` first). `num_cpus`: the CPUs it reserves (a
        cuda spec reserves one GPU as well); `env`: extra environment of the actor's process (OMP_NUM_THREADS);
        `restart`: start a fresh actor when one dies (a server always does; tests of the failure may not)."""
        if not ray.is_initialized():
            raise TreadleError("ray: not connected; call treadle.engine.placement.ray_engine.connect first")
        super().__init__(spec, replica)
        self._num_cpus = num_cpus
        self._env = dict(env or {})
        self._restart = restart
        self._ids = itertools.count(1)
        self._lost: str | None = None  # why the current actor is unusable (None: it is serving)
        self._closing = False
        self._lost_handler: Callable[[str], None] | None = None
        self._model_dir: Path | None = None
        self._actor: Any = None
        self._pid: int | None = None
        self._info = self._start()

    # ---- lifecycle -------------------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """The actor process's pid (on its node)."""
        return self._pid

    def _options(self) -> dict[str, Any]:
        gpu = self.spec.device.startswith("cuda")
        opts: dict[str, Any] = {"num_cpus": self._num_cpus, "num_gpus": 1 if gpu else 0}
        env = dict(self._env)
        if self.spec.memory_headroom_mb is not None:
            # glibc reserves 64 MB of address space per thread arena, which the actor's RLIMIT_AS would count
            env.setdefault("MALLOC_ARENA_MAX", "2")
        if env:
            opts["runtime_env"] = {"env_vars": env}
        return opts

    def _start(self) -> EngineInfo:
        if not ray.is_initialized():  # never let `.remote()` start a runtime of its own (Ray's auto-init)
            raise TreadleError(f"worker for {self.label}: Ray is not connected (shut down?)")
        # Ray hides every GPU but the one it granted: the actor's device is that one, whatever index was asked
        spec = (
            dataclasses.replace(self.spec, device="cuda")
            if self.spec.device.startswith("cuda")
            else self.spec
        )
        actor = _actor_class().options(**self._options()).remote(spec)
        try:
            msg = ray.get(actor.ready.remote(), timeout=START_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            ray.kill(actor, no_restart=True)
            raise TreadleError(
                f"worker for {self.label}: the Ray actor did not start in {START_TIMEOUT_S:.0f} s (does the "
                f"cluster have {self._options()['num_cpus']} CPU(s) and {self._options()['num_gpus']} GPU(s) free?)"
            ) from None
        except ray.exceptions.RayActorError as e:
            raise TreadleError(
                f"worker for {self.label}: the Ray actor died while starting: {_describe_death(e)}"
            ) from None
        if msg[0] != "ready":
            ray.kill(actor, no_restart=True)
            raise unpack_error(msg[1])
        with self._lock:
            self._actor, self._pid, self._lost = actor, msg[2], None
            self._adapters.clear()
        threading.Thread(
            target=self._drain, args=(actor,), name=f"treadle-ray-poll-{self.replica}-{msg[2]}", daemon=True
        ).start()
        return msg[1]

    def set_lost_handler(self, handler: Callable[[str], None]) -> None:
        self._lost_handler = handler

    def close(self) -> None:
        with self._lock:
            self._closing = True
            actor, pending, self._pending = self._actor, self._pending, {}
        err = WorkerLostError(f"worker for {self.label}: closed")
        for p in pending.values():
            if not p.future.done():
                p.future.set_exception(err)
        if actor is not None:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone, or Ray already shut down
                pass

    # ---- the drain: streamed tokens, sample results, and the actor's death ---------------------------------
    def _drain(self, actor: Any) -> None:
        while True:
            with self._lock:
                if self._closing or self._actor is not actor or not ray.is_initialized():
                    return
            try:
                events = ray.get(actor.poll.remote(POLL_S))
            except ray.exceptions.RayActorError as e:
                self._died(actor, e)
                return
            except Exception as e:  # noqa: BLE001 - Ray shut down under us, or a transient error
                if not ray.is_initialized():
                    return
                log.warning("polling the worker of %s failed: %s", self.label, e)
                time.sleep(0.5)
                continue
            for ev in events:
                self._deliver(ev)

    def _died(self, actor: Any, e: BaseException) -> str:
        """Handle `actor`'s death once (the drain and the calls in flight all see it): fail what was pending,
        tell the lost handler, start a fresh actor. Returns why it is unusable."""
        with self._lock:
            if self._closing:
                return f"worker for {self.label}: closed"
            if self._actor is not actor:
                return self._lost or f"worker for {self.label}: its Ray actor was replaced"
            if self._lost is not None:
                return self._lost
            why = f"the Ray actor of {self.label} (pid {self._pid}) died: {_describe_death(e)}"
            self._lost = why
            pending, self._pending = self._pending, {}
            self._adapters.clear()
        log.error("%s; failing %d samples and restarting it", why, len(pending))
        err = WorkerLostError(_lost_message(why))
        for p in pending.values():
            if not p.future.done():
                p.future.set_exception(err)
        if self._lost_handler is not None:
            try:
                self._lost_handler(why)
            except Exception:
                log.exception("lost handler failed")
        if self._restart:
            threading.Thread(target=self._restart_loop, args=(why,), daemon=True).start()
        return why

    def _restart_loop(self, why: str) -> None:
        delay = 1.0
        while True:
            with self._lock:
                if self._closing:
                    return
                self._lost = f"{why}; a fresh worker is starting"
            try:
                self._info = self._start()
                log.warning("worker for %s restarted (Ray actor pid %s)", self.label, self._pid)
                return
            except Exception as e:  # noqa: BLE001 - keep trying: the cluster may be short of resources
                log.error("restarting the worker for %s failed: %s; retrying in %.0f s", self.label, e, delay)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)

    # ---- calling -----------------------------------------------------------------------------------------------
    def _current(self) -> Any:
        with self._lock:
            if self._closing:
                raise WorkerLostError(f"worker for {self.label}: closed")
            if self._lost is not None or self._actor is None:
                raise WorkerLostError(self._lost or f"worker for {self.label}: not running")
            return self._actor

    def _get(self, actor: Any, ref: Any, timeout: float | None = None) -> Any:
        """`ray.get(ref)` of a call to `actor`, with its death turned into WorkerLostError and errors unpacked."""
        try:
            out = ray.get(ref, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise TreadleError(
                f"worker for {self.label}: the Ray actor did not answer in {timeout:.0f} s"
            ) from None
        except ray.exceptions.RayActorError as e:
            if e.actor_id is not None and e.actor_id != actor._actor_id.hex():
                # another replica (the source of an import) died, not this one
                raise WorkerLostError(
                    f"worker for {self.label}: the replica this data came from died: {_describe_death(e)}"
                ) from None
            raise WorkerLostError(_lost_message(self._died(actor, e))) from None
        if out[0] == "err":
            raise unpack_error(out[1])
        return out

    def _call(self, method: str, *args: Any, _timeout: float | None = None, **kwargs: Any) -> Any:
        actor = self._current()
        return self._get(actor, actor.call.remote(method, args, kwargs), _timeout)[1]

    # ---- EngineAPI ---------------------------------------------------------------------------------------------
    def _local_model_dir(self) -> Path:
        """The model's files on this machine: the actor's own directory when this process shares its disk
        (same node), else its non-weight files fetched once into a temp dir (a remote cluster)."""
        if self._model_dir is None:
            d = Path(self.info.tokenizer_dir)
            if not (d / "config.json").is_file():
                actor = self._current()
                files: dict[str, bytes] = ray.get(actor.model_files.remote())
                d = Path(tempfile.mkdtemp(prefix="treadle-ray-model-"))
                for name, data in files.items():
                    (d / name).write_bytes(data)
            self._model_dir = d
        return self._model_dir

    def export_adapter(self, adapter_id: str, *, optimizer: bool = False) -> Any:
        """A `ray.ObjectRef` to the adapter's checkpoint files in Ray's object store (weights only unless
        `optimizer`); hand it to another replica's `import_adapter`. An export error surfaces at the import."""
        actor = self._current()
        return actor.export_adapter.remote(adapter_id, optimizer)

    def import_adapter(self, adapter_id: str, ref: Any, *, optimizer: bool = False) -> LoraConfig:
        """Create `adapter_id` here from another replica's `export_adapter` (the bytes move replica to replica
        through the object store, never through this process)."""
        actor = self._current()
        cfg = self._get(actor, actor.import_adapter.remote(adapter_id, ref, optimizer))[1]
        with self._lock:
            self._adapters.add(adapter_id)
        return cfg

    def forward_backward(self, requests: list[ForwardBackwardRequest]) -> list[Any]:
        actor = self._current()
        _ok, results, errors = self._get(actor, actor.forward_backward.remote(requests))
        return [unpack_error(errors[i]) if i in errors else r for i, r in enumerate(results)]

    def sample(
        self, req: SampleRequest, on_token: TokenCallback | None = None
    ) -> concurrent.futures.Future[SampleResult]:
        fut: concurrent.futures.Future[SampleResult] = concurrent.futures.Future()
        with self._lock:
            if self._closing or self._lost is not None or self._actor is None:
                raise WorkerLostError(self._lost or f"worker for {self.label}: not running")
            actor = self._actor
            sid = next(self._ids)
            self._pending[sid] = Pending(fut, on_token)
        actor.sample.remote(sid, req, on_token is not None)  # answered through the drain

        def cancelled(f: concurrent.futures.Future[SampleResult]) -> None:
            if not f.cancelled():
                return
            with self._lock:
                self._pending.pop(sid, None)
                live = self._actor is actor and self._lost is None and not self._closing
            if live:
                actor.cancel.remote(sid)

        fut.add_done_callback(cancelled)
        return fut

    def health(self) -> dict[str, Any]:
        out = dict(self._call("health", _timeout=HEALTH_TIMEOUT_S))
        out["pid"] = self._pid
        return out


def _lost_message(why: str) -> str:
    return f"{why}; this request was lost with it — retry it (training runs continue from their last saved checkpoint)"
