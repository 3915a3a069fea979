"""Subprocess placement (the default of `treadle serve`): the engine runs in a child process, so the HTTP process
does no tensor work, and a crash or an out-of-memory kill of a model pass takes down one worker, not the server.

    engine = SubprocessEngine(EngineSpec("HuggingFaceTB/SmolLM2-135M-Instruct"))
    engine.create_adapter("a", LoraConfig(rank=8))
    fut = engine.sample(SampleRequest("a", prompt, SamplingParams(max_tokens=16)))

Calls block the calling thread until the child answers (the worker's scheduler thread makes them, one at a
time, so seq_id order holds); samples return a future at once and stream tokens back as the child's sampler
emits them; `future.cancel()` tells the child to stop that generation. The tokenizer and the image expander
are loaded here from the model's files (no weights): chat templates and image checks happen at the edge.

When the child dies, the reader thread sees the socket close: every call in flight and every unfinished sample
fails with `WorkerLostError` naming the worker, the pid and the signal; the lost handler (the `Worker`, which
tells the service) runs; a fresh child is started in the background. Calls made while it starts fail fast with
the same error. The fresh engine has no adapters: runs continue from their last saved checkpoint.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from treadle.engine.placement.api import EngineSpec, WorkerLostError
from treadle.engine.placement.remote import Pending, RemoteEngine
from treadle.engine.placement.wire import recv as _recv
from treadle.engine.placement.wire import send as _send
from treadle.engine.placement.wire import unpack_error
from treadle.engine.types import ForwardBackwardRequest, SampleRequest, SampleResult
from treadle.errors import TreadleError

if TYPE_CHECKING:
    from treadle.engine.engine import EngineInfo
    from treadle.engine.sampler import TokenCallback

log = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0  # loading a large model from disk can take minutes
HEALTH_TIMEOUT_S = 5.0


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "its connection closed"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (kill -9, or the kernel's out-of-memory killer)" if -code == signal.SIGKILL else ""
        return f"it was killed by {name}{hint}"
    return f"it exited with status {code}"


class SubprocessEngine(RemoteEngine):
    placement = "subprocess"

    def __init__(
        self, spec: EngineSpec, *, replica: int = 0, env: dict[str, str] | None = None, restart: bool = True
    ) -> None:
        """`env`: extra environment of the child (e.g. OMP_NUM_THREADS); `restart`: start a fresh child when one
        dies (a server always does; tests of the failure itself may not)."""
        super().__init__(spec, replica)
        self._env = env or {}
        self._restart = restart
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._lost: str | None = None  # why the current child is unusable (None: it is serving)
        self._closing = False
        self._lost_handler: Callable[[str], None] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._info = self._start()

    # ---- lifecycle ---------------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _start(self) -> EngineInfo:
        parent_sock, child_sock = socket.socketpair()
        env = dict(os.environ, **self._env)
        if self.spec.memory_headroom_mb is not None:
            # glibc reserves 64 MB of address space per thread arena, which the worker's RLIMIT_AS would count
            env.setdefault("MALLOC_ARENA_MAX", "2")
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "treadle.engine.placement.child", str(child_sock.fileno())],
                pass_fds=[child_sock.fileno()],
                env=env,
                # its own process group: a signal to the server's group (Ctrl-C, `timeout`, a service
                # manager's SIGTERM) reaches the server, which then closes its workers in order
                start_new_session=True,
            )
        finally:
            child_sock.close()
        conn = Connection(parent_sock.detach())
        try:
            _send(conn, ("spec", self.spec))
            if not conn.poll(START_TIMEOUT_S):
                raise TreadleError(
                    f"worker for {self.label}: the engine did not start in {START_TIMEOUT_S:.0f} s"
                )
            msg = _recv(conn)
        except (EOFError, OSError) as e:
            proc.wait(timeout=30)
            conn.close()
            raise TreadleError(
                f"worker for {self.label}: the process stopped while loading the model "
                f"({_describe_exit(proc.returncode)}; see its stderr above)"
            ) from e
        except BaseException:
            proc.kill()
            conn.close()
            raise
        if msg[0] != "ready":
            proc.wait(timeout=30)
            conn.close()
            raise unpack_error(msg[1])
        self._forget_adapters()
        with self._lock:
            self._proc, self._conn, self._lost = proc, conn, None
        threading.Thread(
            target=self._read, args=(conn, proc), name=f"treadle-worker-reader-{proc.pid}", daemon=True
        ).start()
        return msg[1]

    def set_lost_handler(self, handler: Callable[[str], None]) -> None:
        self._lost_handler = handler

    def close(self) -> None:
        with self._lock:
            self._closing = True
            conn, proc = self._conn, self._proc
        if conn is not None:
            try:
                with self._send_lock:
                    _send(conn, ("close",))
            except (OSError, EOFError):
                pass
        if proc is not None:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        if conn is not None:
            conn.close()

    # ---- the reader: answers, and the child's death -----------------------------------------------------
    def _read(self, conn: Connection, proc: subprocess.Popen[bytes]) -> None:
        while True:
            try:
                msg = _recv(conn)
            except (EOFError, OSError):
                break
            self._deliver(msg)
        self._on_exit(proc)

    def _on_exit(self, proc: subprocess.Popen[bytes]) -> None:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        with self._lock:
            if self._closing or self._proc is not proc:
                return
            why = (
                f"the worker process of {self.label} (pid {proc.pid}) died: {_describe_exit(proc.returncode)}"
            )
            self._lost = why
            pending, self._pending = self._pending, {}
        self._forget_adapters()
        log.error("%s; failing %d requests and restarting it", why, len(pending))
        err = WorkerLostError(
            f"{why}; this request was lost with it — retry it (training runs continue from "
            "their last saved checkpoint)"
        )
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

    def _restart_loop(self, why: str) -> None:
        delay = 1.0
        while not self._closing:
            with self._lock:
                self._lost = f"{why}; a fresh worker is starting"
            try:
                self._info = self._start()
                log.warning("worker for %s restarted (pid %s)", self.label, self.pid)
                return
            except Exception as e:
                log.error("restarting the worker for %s failed: %s; retrying in %.0f s", self.label, e, delay)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)

    # ---- sending ----------------------------------------------------------------------------------------------
    def _submit(
        self, msg_for: Callable[[int], tuple[Any, ...]], on_token: TokenCallback | None = None
    ) -> tuple[int, concurrent.futures.Future[Any]]:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            if self._lost is not None or self._conn is None:
                raise WorkerLostError(self._lost or f"worker for {self.label}: not running")
            conn = self._conn
            rid = next(self._ids)
            self._pending[rid] = Pending(fut, on_token)
        try:
            with self._send_lock:
                _send(conn, msg_for(rid))
        except (OSError, EOFError, ValueError):
            with self._lock:
                self._pending.pop(rid, None)
            raise WorkerLostError(f"worker for {self.label}: its connection is closed") from None
        return rid, fut

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        _rid, fut = self._submit(lambda rid: ("call", rid, method, args, kwargs))
        return fut.result()

    # ---- EngineAPI ------------------------------------------------------------------------------------------
    def forward_backward(self, requests: list[ForwardBackwardRequest]) -> list[Any]:
        return self._call("forward_backward", requests)

    def sample(
        self, req: SampleRequest, on_token: TokenCallback | None = None
    ) -> concurrent.futures.Future[SampleResult]:
        rid, fut = self._submit(lambda rid: ("sample", rid, req, on_token is not None), on_token)

        def cancelled(f: concurrent.futures.Future[Any]) -> None:
            if f.cancelled():
                with self._lock:
                    self._pending.pop(rid, None)
                    conn = self._conn if self._lost is None else None
                if conn is not None:
                    try:
                        with self._send_lock:
                            _send(conn, ("cancel", rid))
                    except (OSError, EOFError, ValueError):
                        pass

        fut.add_done_callback(cancelled)
        return fut

    def health(self) -> dict[str, Any]:
        _rid, fut = self._submit(lambda rid: ("call", rid, "health", (), {}))
        try:
            return dict(fut.result(timeout=HEALTH_TIMEOUT_S))
        except concurrent.futures.TimeoutError:
            raise WorkerLostError(
                f"worker for {self.label}: no answer to a health check in {HEALTH_TIMEOUT_S} s"
            ) from None
