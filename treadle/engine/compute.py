"""The one thread that runs every tensor op of the engines on a device.

Why one thread: PyTorch's CPU kernels run on OpenMP, and OpenMP keeps one team of helper threads per thread that
ever ran a parallel region. As soon as two threads own teams on a machine with few cores, libgomp counts more
managed threads than CPUs and stops spinning between parallel regions: every one of the hundreds of small regions
in a forward then pays a futex wake-up. Measured on 2 vCPUs (SmolLM2-135M, 16 tokens, LoRA): 95 ms when one
thread computes, 160 ms once a second thread has computed too. So model loading, training ops and every sampler
step of an engine run here, on one long-lived thread, and other threads hand their work over with `call`.

The thread interleaves two kinds of work: jobs (`call` / `submit`: a training op, an adapter load, …), run in
arrival order, and loops (`attach`: the sampler), stepped once per round while they report work, so sampling
goes on between training ops exactly as it did under one lock.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from treadle.errors import TreadleError

log = logging.getLogger(__name__)

T = TypeVar("T")


class Loop(Protocol):
    def has_work(self) -> bool:
        """Called on the compute thread with `ComputeThread.cond` held: is a `step` due?"""
        ...

    def step(self) -> None:
        """Called on the compute thread without the condition held; must not raise."""
        ...


_Job = tuple[Callable[[], Any], "concurrent.futures.Future[Any]"]


class ComputeThread:
    """A daemon thread that owns all tensor work of its engines; thread-safe `call`, `submit`, `attach`."""

    def __init__(self, name: str = "treadle-compute") -> None:
        # Guards the job queue and whatever state attached loops read in `has_work` (e.g. the sampler's queue).
        self.cond = threading.Condition()
        self._jobs: collections.deque[_Job] = collections.deque()
        self._loops: list[Loop] = []
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def on_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        """Queue `fn(*args, **kwargs)`; its future holds the result or the exception it raised."""
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self.cond:
            if self._closed:
                raise TreadleError("engine: closed; no new work is accepted")
            self._jobs.append((lambda: fn(*args, **kwargs), fut))
            self.cond.notify()
        return fut

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn` on the compute thread and return its result (inline when already on it)."""
        if self.on_thread:
            return fn(*args, **kwargs)
        return self.submit(fn, *args, **kwargs).result()

    def attach(self, loop: Loop) -> None:
        with self.cond:
            self._loops.append(loop)
            self.cond.notify()

    def detach(self, loop: Loop) -> None:
        with self.cond:
            if loop in self._loops:
                self._loops.remove(loop)

    def wake(self) -> None:
        """Re-check the loops' `has_work` (call after changing what it reads, with or without `cond` held)."""
        with self.cond:
            self.cond.notify()

    def close(self) -> None:
        """Run the jobs already queued, then stop; later `submit`s raise."""
        with self.cond:
            self._closed = True
            self.cond.notify()
        if not self.on_thread:
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not (due := self._due()) and not self._jobs and not self._closed:
                    self.cond.wait()
                if self._closed and not self._jobs:
                    return
                jobs = list(self._jobs)
                self._jobs.clear()
            for fn, fut in jobs:
                if not fut.set_running_or_notify_cancel():
                    continue
                try:
                    fut.set_result(fn())
                except BaseException as e:  # noqa: BLE001 - the caller gets every failure through its future
                    fut.set_exception(e)
            for loop in due:
                try:
                    loop.step()
                except Exception:  # a loop must handle its own errors; never let one kill the thread
                    log.exception("compute loop step failed")

    def _due(self) -> list[Loop]:
        return [loop for loop in self._loops if loop.has_work()]
