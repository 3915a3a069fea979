"""The per-sampler completion log behind `retrieve_futures` stays bounded (it used to grow with every request
and every sampler): the newest `MAX_ITEMS` entries per sampler behind an absolute cursor, and the
`MAX_SAMPLERS` most recently used samplers."""

from __future__ import annotations

import asyncio

import pytest

from treadle.service import completions
from treadle.service.completions import MAX_ITEMS, MAX_SAMPLERS, CompletionLog


def test_entries_per_sampler_are_bounded_and_the_cursor_stays_absolute() -> None:
    async def run() -> None:
        log = CompletionLog()
        n = MAX_ITEMS * 3 + 7
        for i in range(n):
            log._record("s", f"r{i}", failed=i % 5 == 0)
        done, cursor = await log.since("s", 0, 0)
        assert cursor == n and len(done) == MAX_ITEMS  # a lagging client gets what is kept
        assert done[0] == (f"r{n - MAX_ITEMS}", "finished" if (n - MAX_ITEMS) % 5 else "failed")
        done, cursor = await log.since("s", n - 2, 0)
        assert [rid for rid, _ in done] == [f"r{n - 2}", f"r{n - 1}"] and cursor == n
        log._record("s", "last", failed=False)
        assert await log.since("s", n, 0) == ([("last", "finished")], n + 1)

    asyncio.run(run())


def test_samplers_are_bounded_least_recently_used_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(completions, "MAX_SAMPLERS", 3)

    async def run() -> None:
        log = CompletionLog()
        for s in ("a", "b", "c"):
            log._record(s, "r", failed=False)
        await log.since("a", 0, 0)  # "a" used again: "b" is now the oldest
        log._record("d", "r", failed=False)
        assert len(log) == 3
        assert await log.since("a", 0, 0) == ([("r", "finished")], 1)
        assert (await log.since("b", 0, 0))[1] == 0  # dropped

    asyncio.run(run())
    assert MAX_SAMPLERS >= 1000


def test_a_waiter_wakes_when_its_sampler_completes() -> None:
    async def run() -> None:
        log = CompletionLog()
        log.bind()
        waiter = asyncio.create_task(log.since("s", 0, 5.0))
        await asyncio.sleep(0.01)
        log.record_threadsafe("s", "r0", failed=False)
        assert await asyncio.wait_for(waiter, 2.0) == ([("r0", "finished")], 1)

    asyncio.run(run())
