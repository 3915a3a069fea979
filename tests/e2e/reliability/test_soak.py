"""The short soak in CI: training clients (forward_backward / optim_step / save), SDK sampling clients and a
streaming OpenAI client against one server for 30 s: no errors, no hung futures, RSS sampled throughout.
scripts/soak.py runs the long version (32 + 32 clients, minutes) and prints the figures for RELIABILITY.md."""

from __future__ import annotations

import os

import pytest

from tests.e2e.conftest import ServerProcess
from tests.e2e.reliability.conftest import ALICE, World
from tests.e2e.reliability.soak import run_soak

pytestmark = pytest.mark.slow

SECONDS = float(os.environ.get("TREADLE_SOAK_SECONDS", "30"))


def test_short_soak(reliability_server: ServerProcess, worlds: dict[str, World]) -> None:
    assert reliability_server.proc is not None
    report = run_soak(
        reliability_server.base_url,
        ALICE,
        reliability_server.model,
        reliability_server.proc.pid,
        SECONDS,
        trainers=2,
        samplers=2,
        openai_clients=1,
    )
    print("\n" + report.table())
    assert report.errors == [] and report.hung == 0
    for op in ("forward_backward", "optim_step", "save_state", "sample", "openai_stream"):
        assert report.ops.get(op, 0) > 0, (op, report.ops)
    assert len(report.rss_mb) >= SECONDS / 2
