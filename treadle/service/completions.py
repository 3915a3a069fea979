"""Per-sampling-session completion log for `retrieve_futures` (protocol §4.4): which requests of a
sampler finished or failed, in order, behind a cursor the client long-polls. Bounded (issue 11: it only grew):
each sampler keeps its newest `MAX_ITEMS` entries behind an absolute cursor, and only the `MAX_SAMPLERS` most
recently used samplers keep a log; a client whose cursor fell behind gets what is still kept."""

from __future__ import annotations

import asyncio
import collections
import dataclasses

MAX_ITEMS = (
    1024  # entries kept per sampler (the SDK polls each sampler continuously, so it never lags this far)
)
MAX_SAMPLERS = 4096  # samplers whose logs are kept, least recently used dropped first


@dataclasses.dataclass
class _Log:
    items: collections.deque[tuple[str, str]] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=MAX_ITEMS)
    )  # (request_id, finished|failed), the newest MAX_ITEMS
    total: int = 0  # entries ever recorded: the cursor after the newest
    changed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


class CompletionLog:
    """Lives on the event loop; `record_threadsafe` may be called from any thread."""

    def __init__(self) -> None:
        self._logs: collections.OrderedDict[str, _Log] = collections.OrderedDict()
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self) -> None:
        self._loop = asyncio.get_running_loop()

    def record_threadsafe(self, sampler_id: str, request_id: str, failed: bool) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._record, sampler_id, request_id, failed)

    def _record(self, sampler_id: str, request_id: str, failed: bool) -> None:
        log = self._log(sampler_id)
        log.items.append((request_id, "failed" if failed else "finished"))
        log.total += 1
        log.changed.set()
        log.changed = asyncio.Event()  # waiters hold the old event, already set

    async def since(
        self, sampler_id: str, cursor: int, timeout_s: float
    ) -> tuple[list[tuple[str, str]], int]:
        log = self._log(sampler_id)
        cursor = max(0, cursor)
        if log.total <= cursor and timeout_s > 0:
            try:
                await asyncio.wait_for(log.changed.wait(), timeout_s)
            except TimeoutError:
                pass
            log = self._log(sampler_id)
        first = log.total - len(log.items)  # cursor of the oldest entry still kept
        return list(log.items)[max(cursor, first) - first :], log.total

    def _log(self, sampler_id: str) -> _Log:
        log = self._logs.get(sampler_id)
        if log is None:
            log = self._logs[sampler_id] = _Log()
            while len(self._logs) > MAX_SAMPLERS:
                self._logs.popitem(last=False)
        else:
            self._logs.move_to_end(sampler_id)
        return log

    def __len__(self) -> int:
        return len(self._logs)

    def forget(self, sampler_id: str) -> None:
        self._logs.pop(sampler_id, None)
