"""The worker process of the subprocess placement: `python -m treadle.engine.placement.child FD`.

It builds one `Engine` from the `EngineSpec` its parent sends, then answers the parent's messages
(`treadle.engine.placement.wire`) until the parent closes the socket or says "close". Calls run on a small thread
pool (each blocks on the engine's compute thread, which orders the tensor work); samples go straight to the
engine's continuous-batching sampler, so a long forward_backward never holds up a sample's submission, a cancel
or a health check. When the parent dies, the socket reads EOF and this process exits.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import signal
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any

from treadle.engine.placement.wire import pack_error
from treadle.engine.placement.wire import recv as _recv
from treadle.engine.placement.wire import send as _send

log = logging.getLogger("treadle.worker")


class _Server:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._send_lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="treadle-call")
        self._samples: dict[int, concurrent.futures.Future[Any]] = {}
        self._samples_lock = threading.Lock()
        self.engine: Any = None

    def send(self, msg: tuple[Any, ...]) -> None:
        with self._send_lock:
            try:
                _send(self.conn, msg)
            except (OSError, EOFError):
                pass  # the parent is gone; the receive loop ends on its own

    def serve(self) -> None:
        from treadle.engine.placement.local import make_engine

        _kind, spec = _recv(self.conn)
        try:
            self.engine = make_engine(spec)
        except BaseException as e:  # noqa: BLE001 - the parent must learn why the worker could not start
            self.send(("failed", pack_error(e)))
            return
        if hasattr(self.engine, "set_lost_handler"):
            # An engine made of several processes (FSDP2 ranks) that lost one cannot serve again: exit, so the
            # parent sees this worker die and starts a fresh one (ranks and all).
            self.engine.set_lost_handler(lambda why: _exit_lost(why))
        if spec.memory_headroom_mb is not None:
            _limit_memory(spec.memory_headroom_mb)
        self.send(("ready", self.engine.info))
        while True:
            try:
                msg = _recv(self.conn)
            except (EOFError, OSError):
                os._exit(0)  # the parent is gone: nobody is left to answer, and a long op need not finish
            kind = msg[0]
            if kind == "close":
                break
            if kind == "call":
                self._pool.submit(self._call, *msg[1:])
            elif kind == "sample":
                self._sample(*msg[1:])
            elif kind == "cancel":
                with self._samples_lock:
                    fut = self._samples.get(msg[1])
                if fut is not None:
                    fut.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.engine.close()

    def _call(self, rid: int, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        try:
            result = getattr(self.engine, method)(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - every failure is the caller's answer
            self.send(("err", rid, pack_error(e)))
            return
        self.send(("ok", rid, result))

    def _sample(self, rid: int, req: Any, stream: bool) -> None:
        on_token = (lambda i, tok, lp: self.send(("tok", rid, i, tok, lp))) if stream else None
        try:
            fut = self.engine.sample(req, on_token)
        except BaseException as e:  # noqa: BLE001
            self.send(("err", rid, pack_error(e)))
            return
        with self._samples_lock:
            self._samples[rid] = fut
        fut.add_done_callback(lambda f: self._sample_done(rid, f))

    def _sample_done(self, rid: int, fut: concurrent.futures.Future[Any]) -> None:
        with self._samples_lock:
            self._samples.pop(rid, None)
        if fut.cancelled():
            self.send(
                ("err", rid, ("treadle.errors", "UserError", "request_id: the request was cancelled", None))
            )
            return
        e = fut.exception()
        self.send(("err", rid, pack_error(e)) if e is not None else ("ok", rid, fut.result()))


def _exit_lost(why: str) -> None:
    log.error("%s; this worker exits so that a fresh one starts", why)
    os._exit(70)


def _limit_memory(headroom_mb: float) -> None:
    """Cap this process's address space at its current size plus `headroom_mb`: an allocation past it fails
    (torch raises, the request gets an out-of-memory error) and the process lives on."""
    import resource

    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[0])
    limit = pages * os.sysconf("SC_PAGE_SIZE") + int(headroom_mb * 2**20)
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(
        resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard)
    )


def main() -> None:
    logging.basicConfig(level=os.environ.get("TREADLE_WORKER_LOG", "WARNING"), stream=sys.stderr)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent stops us
    conn = Connection(int(sys.argv[1]))
    _Server(conn).serve()
    os._exit(0)  # skip interpreter teardown: daemon threads of torch/OpenMP may still be parked


if __name__ == "__main__":
    main()
