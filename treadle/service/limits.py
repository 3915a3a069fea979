"""Backpressure instead of collapse: per-owner and global limits on what one server holds (active sessions,
resident training runs — each a LoRA adapter in memory — and sampling tokens in flight) and how long a request
body may stall. Over a limit the answer is 429 with `Retry-After`, which the official SDK retries with backoff
(up to 10 times) and the OpenAI client too, so work waits for room instead of exhausting memory; the detail
names the limit, the current use and what frees room."""

from __future__ import annotations

import argparse
import dataclasses
import threading

from treadle.errors import TreadleError, require


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
            ("body_timeout", "body_timeout_s"),
        ):
            value = getattr(args, flag, None)
            if value is not None:
                require(value > 0, "--" + flag.replace("_", "-"), f"must be > 0, got {value}")
                setattr(out, attr, value)
        return out


class Admission:
    """Checks each limit before the service commits to new work; thread-safe token accounting."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._tokens_in_flight = 0

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

    def reserve_tokens(self, tokens: int) -> None:
        """Count a sampling request's tokens in flight; a request alone on the server is always admitted."""
        cap = self.limits.max_sample_tokens_in_flight
        with self._lock:
            if self._tokens_in_flight and self._tokens_in_flight + tokens > cap:
                raise self._refuse(
                    "sampling",
                    f"{self._tokens_in_flight} sampling tokens are in flight and this request adds {tokens}, "
                    f"the server's limit is {cap}; it is busy, retry shortly",
                )
            self._tokens_in_flight += tokens

    def release_tokens(self, tokens: int) -> None:
        with self._lock:
            self._tokens_in_flight = max(0, self._tokens_in_flight - tokens)

    @property
    def tokens_in_flight(self) -> int:
        with self._lock:
            return self._tokens_in_flight
