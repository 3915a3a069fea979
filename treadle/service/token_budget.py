"""Sampling tokens in flight on one server, and the queue of sampling work waiting for room.

A request holds `num_samples × (prompt + max_tokens)` tokens from the moment it starts until its generation
ends (result, error, cancel or a client gone mid-stream). Over the server's budget (or one key's) the work
waits here instead of failing: FIFO within a key and round-robin across keys, so one key's backlog cannot
starve another's single request. A request alone on the server (or alone for its key) always starts: the
context length already bounds it. The queue is bounded per key; past that the caller gets a 429.

Thread-safe: tokens are released from sampler threads; queued work always starts on its own event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import threading
import uuid
from collections import deque
from collections.abc import Callable

from treadle.errors import TreadleError

log = logging.getLogger(__name__)

SERVER_FLAG = "--max-sample-tokens"
OWNER_FLAG = "--max-sample-tokens-per-key"
QUEUE_FLAG = "--max-queued-per-key"


class QueueFull(TreadleError):
    """The caller's key already has its limit of queued requests (`limits` adds the `Retry-After`)."""

    status_code = 429
    category = "user"


@dataclasses.dataclass(eq=False)
class _Waiter:
    key: str
    owner: str
    tokens: int
    group: str | None  # the session it belongs to: ending the session drops it
    start: Callable[[], None]
    abort: Callable[[TreadleError], None]
    loop: asyncio.AbstractEventLoop
    arrival: int


class TokenBudget:
    def __init__(self, cap: int, per_owner_cap: int | None, max_queued_per_owner: int) -> None:
        self.cap = cap
        self.per_owner_cap = per_owner_cap
        self.max_queued_per_owner = max_queued_per_owner
        self._lock = threading.Lock()
        self._in_flight = 0
        self._owner_in_flight: dict[str, int] = {}
        self._queues: dict[str, deque[_Waiter]] = {}  # insertion order is the round-robin order of keys
        self._by_key: dict[str, _Waiter] = {}
        self._arrivals = itertools.count()

    # ---- immediate accounting ------------------------------------------------------------------------
    def try_take(self, owner: str, tokens: int) -> str | None:
        """Take `tokens` now if they fit and nobody is queued; else return why not (nothing taken)."""
        with self._lock:
            if self._by_key:
                return f"{len(self._by_key)} sampling requests are queued for room"
            why = self._blocked(owner, tokens)
            if why is None:
                self._take(owner, tokens)
            return why

    def release(self, owner: str, tokens: int) -> None:
        """Give tokens back (thread-safe) and start whatever queued work now fits."""
        with self._lock:
            self._in_flight = max(0, self._in_flight - tokens)
            left = self._owner_in_flight.get(owner, 0) - tokens
            if left > 0:
                self._owner_in_flight[owner] = left
            else:
                self._owner_in_flight.pop(owner, None)
            granted = self._pump()
        self._dispatch(granted)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def owner_in_flight(self, owner: str) -> int:
        with self._lock:
            return self._owner_in_flight.get(owner, 0)

    @property
    def queued(self) -> int:
        with self._lock:
            return len(self._by_key)

    # ---- the queue -----------------------------------------------------------------------------------
    def submit(
        self,
        key: str,
        owner: str,
        tokens: int,
        start: Callable[[], None],
        abort: Callable[[TreadleError], None],
        group: str | None = None,
    ) -> bool:
        """Start `start()` now if the tokens fit (returns True, `start` has run), else queue it to run on this
        event loop once they do (False). `abort(err)` runs instead if it is dropped from the queue (cancel,
        its session ends). Raises `QueueFull` when `owner` already has its limit of queued requests."""
        loop = asyncio.get_running_loop()
        with self._lock:
            self._check_queue_room(owner)
            w = _Waiter(key, owner, tokens, group, start, abort, loop, next(self._arrivals))
            self._queues.setdefault(owner, deque()).append(w)
            self._by_key[key] = w
            granted = self._pump()
        now = w in granted
        if now:
            granted.remove(w)
            self._start(w)
        self._dispatch(granted)
        return now

    def check_queue_room(self, owner: str) -> None:
        """Raise `QueueFull` if `owner` already has its limit of queued requests."""
        with self._lock:
            self._check_queue_room(owner)

    def cancel(self, key: str, err: TreadleError) -> bool:
        """Drop a queued request (True; its `abort(err)` has run); False if it is not queued (started or unknown)."""
        with self._lock:
            w = self._by_key.get(key)
            if w is None:
                return False
            self._unqueue(w)
            granted = self._pump()  # the dropped head may have held back smaller requests
        w.abort(err)
        self._dispatch(granted)
        return True

    def cancel_group(self, group: str, err: TreadleError) -> int:
        """Drop every queued request of one session; returns how many."""
        with self._lock:
            dropped = [w for w in self._by_key.values() if w.group == group]
            for w in dropped:
                self._unqueue(w)
            granted = self._pump()
        for w in dropped:
            w.abort(err)
        self._dispatch(granted)
        return len(dropped)

    def reason(self, key: str) -> str | None:
        """Why a queued request waits (the limit, its current use, the requests ahead); None if not queued."""
        with self._lock:
            w = self._by_key.get(key)
            if w is None:
                return None
            ahead = sum(1 for o in self._by_key.values() if o.arrival < w.arrival)
            mine = self._owner_in_flight.get(w.owner, 0)
            if self._blocked(w.owner, w.tokens) == "owner":
                use = (
                    f"this API key has {mine} of its {self.per_owner_cap} sampling tokens in flight "
                    f"({OWNER_FLAG})"
                )
            else:
                use = f"{self._in_flight} of the server's {self.cap} sampling tokens are in flight ({SERVER_FLAG})"
            return (
                f"sampling: queued for room: {use} and this request needs {w.tokens}; "
                f"{ahead} queued requests arrived before it; it starts when room frees"
            )

    async def wait(self, owner: str, tokens: int, timeout_s: float) -> Callable[[], None]:
        """Wait up to `timeout_s` for room (in the same queue as everything else), then hold the tokens; returns
        the idempotent function that releases them. Raises `TimeoutError` (carrying the queue's reason) if
        no room came, `QueueFull` past the key's queue limit; a cancelled wait holds nothing."""
        loop = asyncio.get_running_loop()
        granted: asyncio.Future[None] = loop.create_future()
        key = f"wait:{uuid.uuid4().hex}"

        def start() -> None:
            if granted.done():  # the waiter gave up between the grant and this call
                self.release(owner, tokens)
            else:
                granted.set_result(None)

        def abort(_err: TreadleError) -> None:
            if not granted.done():
                granted.cancel()

        if not self.submit(key, owner, tokens, start, abort):
            reason = self.reason(key)
            try:
                await asyncio.wait_for(granted, timeout_s)
            except BaseException as e:
                with self._lock:
                    w = self._by_key.get(key)
                    if w is not None:
                        self._unqueue(w)
                        pumped = self._pump()
                    else:
                        pumped = []
                self._dispatch(pumped)
                if w is None and granted.done() and not granted.cancelled():
                    self.release(owner, tokens)  # granted, but the caller is gone: give the room back
                # (granted but `start` not yet run: it finds the future cancelled and releases)
                if isinstance(e, TimeoutError):
                    raise TimeoutError(reason or "sampling: no room came") from None
                raise
        return _once(lambda: self.release(owner, tokens))

    # ---- internals (called with the lock held) -------------------------------------------------------
    def _blocked(self, owner: str, tokens: int) -> str | None:
        if self._in_flight and self._in_flight + tokens > self.cap:
            return "server"
        mine = self._owner_in_flight.get(owner, 0)
        if self.per_owner_cap is not None and mine and mine + tokens > self.per_owner_cap:
            return "owner"
        return None

    def _check_queue_room(self, owner: str) -> None:
        queue = self._queues.get(owner)
        if queue is not None and len(queue) >= self.max_queued_per_owner:
            raise QueueFull(
                f"sampling: this API key has {len(queue)} sampling requests queued for room, the limit is "
                f"{self.max_queued_per_owner} ({QUEUE_FLAG}); wait for some to finish"
            )

    def _take(self, owner: str, tokens: int) -> None:
        self._in_flight += tokens
        self._owner_in_flight[owner] = self._owner_in_flight.get(owner, 0) + tokens

    def _unqueue(self, w: _Waiter) -> None:
        del self._by_key[w.key]
        queue = self._queues[w.owner]
        queue.remove(w)
        if not queue:
            del self._queues[w.owner]

    def _pump(self) -> list[_Waiter]:
        """Grant queued heads in round-robin order of keys. A head held back by the server's budget stops the
        pass (later keys may not jump it, or a large request would starve); one held back only by its own key's
        budget is passed over (its own running work frees that room)."""
        granted: list[_Waiter] = []
        progressed = True
        while progressed:
            progressed = False
            for owner in list(self._queues):
                w = self._queues[owner][0]
                why = self._blocked(owner, w.tokens)
                if why == "owner":
                    continue
                if why == "server":
                    return granted
                self._unqueue(w)
                self._take(owner, w.tokens)
                if owner in self._queues:  # to the back of the rotation
                    self._queues[owner] = self._queues.pop(owner)
                granted.append(w)
                progressed = True
                break
        return granted

    # ---- starting work (lock not held) ---------------------------------------------------------------
    def _dispatch(self, granted: list[_Waiter]) -> None:
        for w in granted:
            try:
                w.loop.call_soon_threadsafe(self._start, w)
            except RuntimeError:  # its event loop is gone (server stopping): nothing will run it
                self.release(w.owner, w.tokens)

    def _start(self, w: _Waiter) -> None:
        try:
            w.start()
        except Exception:
            log.exception("sampling: queued work failed to start; its tokens are released")
            self.release(w.owner, w.tokens)


def _once(fn: Callable[[], None]) -> Callable[[], None]:
    lock = threading.Lock()
    done = False

    def call() -> None:
        nonlocal done
        with lock:
            if done:
                return
            done = True
        fn()

    return call
