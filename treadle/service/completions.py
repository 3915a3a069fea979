"""Per-sampling-session completion log for `retrieve_futures` (protocol §4.4): which requests of a
sampler finished or failed, in order, behind a cursor the client long-polls."""

from __future__ import annotations

import asyncio
import dataclasses


@dataclasses.dataclass
class _Log:
    items: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (request_id, finished|failed)
    changed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


class CompletionLog:
    """Lives on the event loop; `record_threadsafe` may be called from any thread."""

    def __init__(self) -> None:
        self._logs: dict[str, _Log] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self) -> None:
        self._loop = asyncio.get_running_loop()

    def record_threadsafe(self, sampler_id: str, request_id: str, failed: bool) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._record, sampler_id, request_id, failed)

    def _record(self, sampler_id: str, request_id: str, failed: bool) -> None:
        log = self._logs.setdefault(sampler_id, _Log())
        log.items.append((request_id, "failed" if failed else "finished"))
        log.changed.set()
        log.changed = asyncio.Event()  # waiters hold the old event, already set

    async def since(
        self, sampler_id: str, cursor: int, timeout_s: float
    ) -> tuple[list[tuple[str, str]], int]:
        log = self._logs.setdefault(sampler_id, _Log())
        cursor = max(0, cursor)
        if len(log.items) <= cursor and timeout_s > 0:
            try:
                await asyncio.wait_for(log.changed.wait(), timeout_s)
            except TimeoutError:
                pass
        return log.items[cursor:], len(log.items)

    def forget(self, sampler_id: str) -> None:
        self._logs.pop(sampler_id, None)
