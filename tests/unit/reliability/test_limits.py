"""The backpressure limits: flags parse into `Limits` (and refuse non-positive values), each limit refuses with
a 429 naming itself, and sampling tokens are counted in and out (a request alone is always admitted)."""

from __future__ import annotations

import argparse

import pytest

from treadle.errors import UserError
from treadle.service.limits import Admission, Limits, RateLimited


def _parse(*argv: str) -> Limits:
    p = argparse.ArgumentParser()
    Limits.add_arguments(p)
    return Limits.from_args(p.parse_args(list(argv)))


def test_flags() -> None:
    assert _parse() == Limits()
    got = _parse("--max-sessions-per-key", "3", "--max-runs-per-key", "2", "--max-sample-tokens", "40")
    assert (got.max_sessions_per_owner, got.max_runs_per_owner, got.max_sample_tokens_in_flight) == (3, 2, 40)
    assert _parse("--body-timeout", "1.5").body_timeout_s == 1.5
    with pytest.raises(UserError, match="--max-runs-per-key: must be > 0, got 0"):
        _parse("--max-runs-per-key", "0")


def test_session_and_run_limits_name_themselves() -> None:
    a = Admission(Limits(max_sessions_per_owner=2, max_runs_per_owner=1))
    a.admit_session(1)
    with pytest.raises(RateLimited) as e:
        a.admit_session(2)
    assert e.value.status_code == 429 and e.value.field == "sessions" and e.value.retry_after_s == 2.0
    a.admit_run(0)
    with pytest.raises(RateLimited, match="training_runs: this API key holds 1 training runs"):
        a.admit_run(1)


def test_sampling_tokens_in_and_out() -> None:
    a = Admission(Limits(max_sample_tokens_in_flight=100))
    a.reserve_tokens(500)  # alone on the server: admitted even over the limit (bounded by the context length)
    with pytest.raises(RateLimited, match="sampling: 500 sampling tokens are in flight"):
        a.reserve_tokens(1)
    a.release_tokens(500)
    a.reserve_tokens(60)
    a.reserve_tokens(40)
    with pytest.raises(RateLimited):
        a.reserve_tokens(1)
    a.release_tokens(60)
    assert a.tokens_in_flight == 40
