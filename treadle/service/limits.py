"""Backpressure instead of collapse: per-owner and global limits on what one server holds (active sessions,
resident training runs — each a LoRA adapter in memory — and sampling tokens in flight) and how long a request
body may stall. Creating sessions and runs over a limit is answered 429 with `Retry-After`, which the official
SDK retries with backoff; the detail names the limit, the current use and what frees room.

Sampling over the token budget queues instead (`treadle.service.token_budget`): a Tinker `asample` is accepted
and its future polls as 408 `queue_state: "paused_capacity"` with a `queue_state_reason` until room frees; an
OpenAI request waits server-side up to `--queue-wait-s`, then gets a 429 naming the limit (the openai client
retries it). Only a key's queue past `--max-queued-per-key` is refused outright (429)."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

from treadle.errors import TreadleError, require
from treadle.service.token_budget import QueueFull, TokenBudget


class RateLimited(TreadleError):
    """429: the server is at a limit; retry after `retry_after_s` (sent as the `Retry-After` header)."""

    status_code = 429
    category = "user"

    def __init__(self, message: str, *, field: str, retry_after_s: float) -> None:
        super().__init__(message, field=field)
        self.retry_after_s = retry_after_s


@dataclasses.dataclass
class Limits:
    max_sessions_per_owner: int = 1000  # active (not finished or expired) sessions of one API key
    max_runs_per_owner: int = 64  # training runs one API key holds in memory (one LoRA adapter each)
    max_sample_tokens_in_flight: int = 1_000_000  # Σ num_samples × (prompt + max_tokens), all owners
    max_sample_tokens_per_owner: int | None = None  # the same, one API key (None: only the server's limit)
    max_queued_per_owner: int = 1024  # sampling requests one API key may have waiting for room
    queue_wait_s: float = 30.0  # how long an OpenAI request waits for room before a 429
    body_timeout_s: float = 60.0  # a request body silent this long is answered 408
    retry_after_s: float = 2.0

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        d = Limits()
        parser.add_argument(
            "--max-sessions-per-key",
            type=int,
            default=None,
            help=f"active sessions one API key may hold (default {d.max_sessions_per_owner})",
        )
        parser.add_argument(
            "--max-runs-per-key",
            type=int,
            default=None,
            help=f"training runs (adapters) one API key may hold in memory (default {d.max_runs_per_owner})",
        )
        parser.add_argument(
            "--max-sample-tokens",
            type=int,
            default=None,
            help="sampling tokens in flight on the server, num_samples × (prompt + max_tokens) summed "
            f"(default {d.max_sample_tokens_in_flight})",
        )
        parser.add_argument(
            "--max-sample-tokens-per-key",
            type=int,
            default=None,
            help="sampling tokens in flight for one API key (default: only the server's limit)",
        )
        parser.add_argument(
            "--max-queued-per-key",
            type=int,
            default=None,
            help="sampling requests one API key may have queued for room before a 429 "
            f"(default {d.max_queued_per_owner})",
        )
        parser.add_argument(
            "--queue-wait-s",
            type=float,
            default=None,
            help="seconds an OpenAI request waits for sampling room before a 429 with Retry-After "
            f"(default {d.queue_wait_s:g}); Tinker samples queue until room frees",
        )
        parser.add_argument(
            "--body-timeout",
            type=float,
            default=None,
            help=f"seconds a request body may stall before a 408 (default {d.body_timeout_s:g})",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Limits:
        out = cls()
        for flag, attr in (
            ("max_sessions_per_key", "max_sessions_per_owner"),
            ("max_runs_per_key", "max_runs_per_owner"),
            ("max_sample_tokens", "max_sample_tokens_in_flight"),
            ("max_sample_tokens_per_key", "max_sample_tokens_per_owner"),
            ("max_queued_per_key", "max_queued_per_owner"),
            ("queue_wait_s", "queue_wait_s"),
            ("body_timeout", "body_timeout_s"),
        ):
            value = getattr(args, flag, None)
            if value is not None:
                require(value > 0, "--" + flag.replace("_", "-"), f"must be > 0, got {value}")
                setattr(out, attr, value)
        return out


class Admission:
    """Checks each limit before the service commits to new work; `budget` counts and queues sampling tokens."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.budget = TokenBudget(
            limits.max_sample_tokens_in_flight,
            limits.max_sample_tokens_per_owner,
            limits.max_queued_per_owner,
        )

    def _refuse(self, field: str, message: str) -> RateLimited:
        return RateLimited(f"{field}: {message}", field=field, retry_after_s=self.limits.retry_after_s)

    def admit_session(self, active_sessions: int) -> None:
        cap = self.limits.max_sessions_per_owner
        if active_sessions >= cap:
            raise self._refuse(
                "sessions",
                f"this API key has {active_sessions} active sessions, the limit is {cap}; finish sessions "
                "you no longer use (ServiceClient closes its own) or let them expire",
            )

    def admit_run(self, resident_runs: int) -> None:
        cap = self.limits.max_runs_per_owner
        if resident_runs >= cap:
            raise self._refuse(
                "training_runs",
                f"this API key holds {resident_runs} training runs in memory, the limit is {cap}; finish the "
                "sessions of runs you no longer train (their checkpoints stay loadable)",
            )

    def reserve_tokens(self, tokens: int, owner: str = "") -> None:
        """Count sampling tokens in flight now, or refuse with a 429 (no queueing); a request alone on the
        server is always admitted."""
        why = self.budget.try_take(owner, tokens)
        if why is not None:
            raise self._refuse(
                "sampling",
                f"{self.budget.in_flight} sampling tokens are in flight and this request adds {tokens}, "
                f"the server's limit is {self.limits.max_sample_tokens_in_flight} ({why}); retry shortly",
            )

    def release_tokens(self, tokens: int, owner: str = "") -> None:
        self.budget.release(owner, tokens)

    def check_queue_room(self, owner: str) -> None:
        """429 if `owner` already has its limit of sampling requests queued for room."""
        try:
            self.budget.check_queue_room(owner)
        except QueueFull as e:
            raise self._refuse("sampling", e.message.removeprefix("sampling: ")) from None

    def queue_sample(
        self,
        request_id: str,
        owner: str,
        tokens: int,
        start: Callable[[], None],
        abort: Callable[[TreadleError], None],
        session_id: str,
    ) -> bool:
        """Start a sampling request now or queue it (see `TokenBudget.submit`); 429 past the key's queue limit."""
        try:
            return self.budget.submit(request_id, owner, tokens, start, abort, session_id)
        except QueueFull as e:
            raise self._refuse("sampling", e.message.removeprefix("sampling: ")) from None

    async def wait_for_tokens(self, owner: str, tokens: int) -> Callable[[], None]:
        """Hold sampling tokens for a request that answers synchronously (OpenAI), waiting up to
        `queue_wait_s` for room; then a 429 naming the limit. Returns the (idempotent) release."""
        try:
            return await self.budget.wait(owner, tokens, self.limits.queue_wait_s)
        except QueueFull as e:
            raise self._refuse("sampling", e.message.removeprefix("sampling: ")) from None
        except TimeoutError as e:
            raise self._refuse(
                "sampling",
                f"no room for {tokens} sampling tokens came within {self.limits.queue_wait_s:g} s "
                f"(--queue-wait-s); when it arrived: {str(e).removeprefix('sampling: ')}",
            ) from None

    @property
    def tokens_in_flight(self) -> int:
        return self.budget.in_flight
