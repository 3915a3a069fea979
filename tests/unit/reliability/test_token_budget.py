"""The sampling-token budget and its queue: work over the budget waits instead of failing, FIFO within a key
and round-robin across keys; a key's own budget does not hold back others; the queue is bounded per key (429
naming the flag); dropped work never holds tokens; an OpenAI-style wait times out with the reason, and a
cancelled or timed-out wait leaves nothing held; releases from another thread start queued work on its loop."""

from __future__ import annotations

import asyncio
import threading

import pytest

from treadle.errors import TreadleError, UserError
from treadle.service.limits import Admission, Limits, RateLimited
from treadle.service.token_budget import QueueFull, TokenBudget


class Log:
    """Records which queued work started or was aborted, in order."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def start(self, name: str):
        return lambda: self.events.append(f"start {name}")

    def abort(self, name: str):
        def abort(err: TreadleError) -> None:
            self.events.append(f"abort {name}: {err.message}")

        return abort


async def _settle() -> None:
    for _ in range(5):  # queued work starts through call_soon_threadsafe
        await asyncio.sleep(0)


def test_fifo_within_a_key_round_robin_across_keys() -> None:
    async def run() -> None:
        b, log = TokenBudget(10, None, 100), Log()
        assert b.submit("a1", "alice", 10, log.start("a1"), log.abort("a1"))
        for name, owner in (("a2", "alice"), ("a3", "alice"), ("b1", "bob"), ("a4", "alice")):
            assert not b.submit(name, owner, 10, log.start(name), log.abort(name))
        assert b.in_flight == 10 and b.queued == 4
        for held in ("alice", "alice", "bob", "alice"):
            b.release(held, 10)
            await _settle()
        # bob's one request does not wait behind alice's whole backlog
        assert log.events == ["start a1", "start a2", "start b1", "start a3", "start a4"]
        b.release("alice", 10)
        assert b.in_flight == 0 and b.owner_in_flight("alice") == 0

    asyncio.run(run())


def test_alone_over_the_budget_starts_and_small_work_does_not_jump_a_large_head() -> None:
    async def run() -> None:
        b, log = TokenBudget(100, None, 100), Log()
        assert b.submit("huge", "a", 500, log.start("huge"), log.abort("huge"))  # bounded by the context
        assert not b.submit("big", "b", 90, log.start("big"), log.abort("big"))
        assert not b.submit("small", "c", 5, log.start("small"), log.abort("small"))  # would fit, but waits
        b.release("a", 500)
        await _settle()
        assert log.events == ["start huge", "start big", "start small"] and b.in_flight == 95

    asyncio.run(run())


def test_a_keys_own_budget_passes_it_over_not_others() -> None:
    async def run() -> None:
        b, log = TokenBudget(100, 10, 100), Log()
        assert b.submit("a1", "alice", 10, log.start("a1"), log.abort("a1"))
        assert not b.submit("a2", "alice", 10, log.start("a2"), log.abort("a2"))
        reason = b.reason("a2")
        assert reason is not None and "this API key has 10 of its 10 sampling tokens in flight" in reason
        assert "--max-sample-tokens-per-key" in reason
        assert b.submit("b1", "bob", 10, log.start("b1"), log.abort("b1"))  # alice's queue does not block bob
        b.release("alice", 10)
        await _settle()
        assert log.events == ["start a1", "start b1", "start a2"]

    asyncio.run(run())


def test_reason_names_the_limit_use_and_requests_ahead() -> None:
    async def run() -> None:
        b, log = TokenBudget(40, None, 100), Log()
        b.submit("r1", "a", 40, log.start("r1"), log.abort("r1"))
        b.submit("r2", "a", 40, log.start("r2"), log.abort("r2"))
        b.submit("r3", "b", 30, log.start("r3"), log.abort("r3"))
        assert b.reason("r1") is None and b.reason("nope") is None
        assert b.reason("r3") == (
            "sampling: queued for room: 40 of the server's 40 sampling tokens are in flight "
            "(--max-sample-tokens) and this request needs 30; 1 queued requests arrived before it; it starts "
            "when room frees"
        )

    asyncio.run(run())


def test_queue_is_bounded_per_key_with_a_429_naming_the_flag() -> None:
    async def run() -> None:
        a, log = Admission(Limits(max_sample_tokens_in_flight=10, max_queued_per_owner=2)), Log()
        a.queue_sample("r0", "alice", 10, log.start("r0"), log.abort("r0"), "s")
        a.queue_sample("r1", "alice", 10, log.start("r1"), log.abort("r1"), "s")
        a.queue_sample("r2", "alice", 10, log.start("r2"), log.abort("r2"), "s")
        with pytest.raises(RateLimited) as e:
            a.queue_sample("r3", "alice", 10, log.start("r3"), log.abort("r3"), "s")
        assert e.value.status_code == 429 and e.value.field == "sampling" and e.value.retry_after_s == 2.0
        assert "2 sampling requests queued for room, the limit is 2 (--max-queued-per-key)" in e.value.message
        with pytest.raises(RateLimited):
            a.check_queue_room("alice")
        a.check_queue_room("bob")  # another key's queue is its own
        a.queue_sample("b0", "bob", 10, log.start("b0"), log.abort("b0"), "t")
        with pytest.raises(QueueFull):
            a.budget.submit("r4", "alice", 10, log.start("r4"), log.abort("r4"))

    asyncio.run(run())


def test_dropped_work_never_holds_tokens() -> None:
    async def run() -> None:
        b, log = TokenBudget(10, None, 100), Log()
        b.submit("run", "a", 10, log.start("run"), log.abort("run"), group="s1")
        b.submit("q1", "a", 10, log.start("q1"), log.abort("q1"), group="s1")
        b.submit("q2", "b", 10, log.start("q2"), log.abort("q2"), group="s2")
        b.submit("q3", "a", 10, log.start("q3"), log.abort("q3"), group="s1")
        assert b.cancel("q2", UserError("cancelled")) and not b.cancel("q2", UserError("again"))
        assert not b.cancel("run", UserError("running work is not in the queue"))
        assert b.cancel_group("s1", UserError("session finished")) == 2
        assert b.queued == 0 and b.in_flight == 10
        b.release("a", 10)
        await _settle()
        assert b.in_flight == 0
        assert log.events == [
            "start run",
            "abort q2: cancelled",
            "abort q1: session finished",
            "abort q3: session finished",
        ]

    asyncio.run(run())


def test_cancelling_the_head_starts_what_it_held_back() -> None:
    async def run() -> None:
        b, log = TokenBudget(100, None, 100), Log()
        b.submit("r", "a", 60, log.start("r"), log.abort("r"))
        b.submit("big", "b", 90, log.start("big"), log.abort("big"))
        b.submit("small", "c", 30, log.start("small"), log.abort("small"))
        b.cancel("big", UserError("cancelled"))
        await _settle()
        assert log.events == ["start r", "abort big: cancelled", "start small"] and b.in_flight == 90

    asyncio.run(run())


def test_release_from_a_sampler_thread_starts_queued_work_on_its_loop() -> None:
    async def run() -> None:
        b = TokenBudget(10, None, 100)
        started = asyncio.Event()
        on_loop: list[bool] = []
        loop = asyncio.get_running_loop()

        def start() -> None:
            on_loop.append(asyncio.get_running_loop() is loop)
            started.set()

        b.submit("r1", "a", 10, lambda: None, lambda _e: None)
        b.submit("r2", "a", 10, start, lambda _e: None)
        t = threading.Thread(target=b.release, args=("a", 10))
        t.start()
        await asyncio.wait_for(started.wait(), 5)
        t.join()
        assert on_loop == [True] and b.in_flight == 10

    asyncio.run(run())


def test_wait_times_out_with_the_reason_and_holds_nothing() -> None:
    async def run() -> None:
        a = Admission(Limits(max_sample_tokens_in_flight=10, queue_wait_s=0.05))
        a.reserve_tokens(10, "other")
        with pytest.raises(RateLimited) as e:
            await a.wait_for_tokens("me", 4)
        msg = e.value.message
        assert e.value.status_code == 429 and msg.startswith("sampling: no room for 4 sampling tokens came")
        assert "(--queue-wait-s)" in msg and "10 of the server's 10 sampling tokens are in flight" in msg
        assert a.tokens_in_flight == 10 and a.budget.queued == 0
        a.release_tokens(10, "other")
        release = await a.wait_for_tokens("me", 4)  # room: held at once
        assert a.tokens_in_flight == 4
        release()
        release()  # idempotent
        assert a.tokens_in_flight == 0

    asyncio.run(run())


def test_wait_granted_later_and_a_cancelled_wait_holds_nothing() -> None:
    async def run() -> None:
        a = Admission(Limits(max_sample_tokens_in_flight=10, queue_wait_s=5))
        a.reserve_tokens(10, "other")
        waiting = asyncio.create_task(a.wait_for_tokens("me", 8))
        await _settle()
        assert a.budget.queued == 1
        a.release_tokens(10, "other")
        release = await waiting
        assert a.tokens_in_flight == 8
        release()

        a.reserve_tokens(10, "other")
        gone = asyncio.create_task(a.wait_for_tokens("me", 8))  # a client that disconnects while waiting
        await _settle()
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert a.budget.queued == 0
        # granted in the same instant the waiter left: the grant is given back, not leaked
        late = asyncio.create_task(a.wait_for_tokens("me", 8))
        await _settle()
        late.cancel()  # the waiter leaves (its task runs first) ...
        a.release_tokens(10, "other")  # ... while the grant is already scheduled on the loop
        with pytest.raises(asyncio.CancelledError):
            await late
        await _settle()
        assert a.tokens_in_flight == 0 and a.budget.queued == 0

    asyncio.run(run())


def test_reserve_refuses_while_others_queue() -> None:
    async def run() -> None:
        a = Admission(Limits(max_sample_tokens_in_flight=10))
        a.queue_sample("r1", "x", 10, lambda: None, lambda _e: None, "s")
        a.queue_sample("r2", "x", 10, lambda: None, lambda _e: None, "s")
        with pytest.raises(RateLimited, match=r"\(1 sampling requests are queued for room\)"):
            a.reserve_tokens(1, "y")

    asyncio.run(run())
