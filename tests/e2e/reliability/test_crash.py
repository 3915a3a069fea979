"""Crash trials in CI: `kill -9` the server (and its client) at random moments during training, sampling and
checkpoint saves/publishes/exports/deletes; after each restart every request resolves (result or a `server`
error), every listed checkpoint is complete and equals what was saved, DB and files agree, and a client
continues. Two trials on SQLite; one on PostgreSQL when TREADLE_TEST_POSTGRES_URL is set
(`bash scripts/start_postgres.sh` prints one). scripts/crash_trials.py runs the long version."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.e2e.reliability.crash import crash_server, run_trial

pytestmark = pytest.mark.slow

PG_URL = os.environ.get("TREADLE_TEST_POSTGRES_URL")


def _trials(model_dir: Path, data_dir: Path, n: int, seed: int, db_url: str | None = None) -> None:
    server = crash_server(model_dir, data_dir, db_url)
    server.start()
    rng = random.Random(seed)
    resume = None
    try:
        for trial in range(n):
            result, resume = run_trial(server, trial, rng, resume)
            assert not result.problems, (trial, result)
            assert result.requests_in_flight > 0 and result.checkpoints_listed > 0, result
    finally:
        server.stop()


def test_kill_9_loses_nothing_on_sqlite(e2e_model_dir: Path, tmp_path: Path) -> None:
    _trials(e2e_model_dir, tmp_path / "data", n=2, seed=11)


@pytest.mark.skipif(not PG_URL, reason="TREADLE_TEST_POSTGRES_URL not set (bash scripts/start_postgres.sh)")
def test_kill_9_loses_nothing_on_postgres(e2e_model_dir: Path, tmp_path: Path) -> None:
    _trials(e2e_model_dir, tmp_path / "data", n=1, seed=12, db_url=PG_URL)
